"""Rank 0's counters and their Prometheus text (``GET /metrics``). Imports nothing of the
package."""

import math
import threading

__all__ = ["Metrics"]

#: Latency histogram buckets (seconds), Prometheus style.
_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, math.inf)


class Metrics:
    """Counters for ``/metrics`` (rank 0)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.latency = [0] * len(_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.images = 0
        self.batches = 0
        self.batch_images = 0
        self.aborted_batches = 0
        self.step_s_sum = 0.0
        self.steps = 0
        self.queue_s_sum = 0.0
        self.run_s_sum = 0.0
        self.encode_s_sum = 0.0
        self.timed_jobs = 0

    def request(self, status: int, seconds: float | None = None) -> None:
        """One answered request (``seconds``: its latency, for the successful ones)."""
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, b in enumerate(_BUCKETS):
                    if seconds <= b:
                        self.latency[i] += 1

    def batch(self, images: int, step_s: float, steps: int) -> None:
        """One finished batch of ``images``: ``steps`` denoising steps in ``step_s`` seconds."""
        with self._lock:
            self.batches += 1
            self.batch_images += images
            self.images += images
            self.step_s_sum += step_s
            self.steps += steps

    def stages(self, jobs: int, queue_s: float, run_s: float, encode_s: float) -> None:
        """The stage times of ``jobs`` finished requests (sums over them)."""
        with self._lock:
            self.timed_jobs += jobs
            self.queue_s_sum += queue_s
            self.run_s_sum += run_s
            self.encode_s_sum += encode_s

    def render(self, queue_len: int, running: int, bytes_sent: int) -> str:
        """The Prometheus text exposition of every counter."""
        with self._lock:
            out = [
                *_gauge("xdit_queue_length", "Requests waiting.", queue_len),
                *_gauge("xdit_running_requests", "Requests in the running batch.", running),
                *self._requests(),
                *self._work(),
                "# HELP xdit_bytes_sent_total Bytes rank 0 sent to other ranks.",
                "# TYPE xdit_bytes_sent_total counter",
                f"xdit_bytes_sent_total {bytes_sent}",
            ]
            return "\n".join(out) + "\n"

    def _requests(self) -> list[str]:
        """Answered requests by status and the latency histogram (lock held)."""
        out = [
            "# HELP xdit_requests_total Answered requests by HTTP status.",
            "# TYPE xdit_requests_total counter",
        ]
        out += [
            f'xdit_requests_total{{status="{s}"}} {c}' for s, c in sorted(self.requests.items())
        ]
        out += [
            "# HELP xdit_request_seconds Latency of successful requests (queue + run).",
            "# TYPE xdit_request_seconds histogram",
        ]
        out += [
            f'xdit_request_seconds_bucket{{le="{"+Inf" if math.isinf(b) else b}"}} {c}'
            for b, c in zip(_BUCKETS, self.latency, strict=True)
        ]
        out += [
            f"xdit_request_seconds_sum {self.latency_sum:.6f}",
            f"xdit_request_seconds_count {self.latency_count}",
        ]
        return out

    def _work(self) -> list[str]:
        """Images, batches, steps and stage times (lock held)."""
        out: list[str] = []
        for name in ("images", "batches", "batch_images", "aborted_batches"):
            out += [f"# TYPE xdit_{name}_total counter", f"xdit_{name}_total {getattr(self, name)}"]
        return out + [
            "# HELP xdit_step_seconds Denoising steps (rank 0).",
            "# TYPE xdit_step_seconds summary",
            f"xdit_step_seconds_sum {self.step_s_sum:.6f}",
            f"xdit_step_seconds_count {self.steps}",
            "# HELP xdit_stage_seconds Time per stage of finished requests: waiting in the queue, "
            "the pipeline call (steps, VAE), encoding the answer.",
            "# TYPE xdit_stage_seconds summary",
            f'xdit_stage_seconds_sum{{stage="queue"}} {self.queue_s_sum:.6f}',
            f'xdit_stage_seconds_sum{{stage="run"}} {self.run_s_sum:.6f}',
            f'xdit_stage_seconds_sum{{stage="encode"}} {self.encode_s_sum:.6f}',
            f"xdit_stage_seconds_count {self.timed_jobs}",
        ]


def _gauge(name: str, help_text: str, value: int) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]

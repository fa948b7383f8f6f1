"""PipeFusion's schedule as data: per-rank action lists, a printer and a dry-run simulator.

One transformer call (one denoising step, or one CFG branch of it) runs ``M`` patches through
``N`` stages; stage ``s`` runs on rank ``s`` of the ``pipefusion`` axis. Each rank's actions:

- ``POST j``: post the receive of patch ``j``'s activations from the previous stage (all posted
  first, so no send ever waits for its receive to be posted);
- ``WAIT j``: wait until patch ``j`` has arrived;
- ``RUN j``: run this stage on patch ``j`` (patches in order: the displaced-K/V semantics need it);
- ``SEND j``: start sending patch ``j``'s activations to the next stage (asynchronous);
- ``DRAIN``: wait until every send has completed (tensors are kept alive until then);
- ``BCAST``: the last stage joins the patches' outputs and broadcasts them to every stage.

:func:`simulate` dry-runs the lists with zero-capacity sends (a send completes only once its
receive is posted) and in-order execution per rank, and raises :class:`Deadlock` naming the stuck
actions; it also gives each ``RUN`` its time slot, which :func:`grid` prints as a step x rank
table. The pipeline fills and drains within each call, so the best speedup over one rank, before
communication, is ``N*M / (M + N - 1)`` (:func:`speedup_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Action", "Deadlock", "grid", "pipefusion_schedule", "simulate", "speedup_bound"]


@dataclass(frozen=True, slots=True)
class Action:
    kind: str
    """"POST", "WAIT", "RUN", "SEND", "DRAIN" or "BCAST"."""
    patch: int = -1

    def __str__(self) -> str:
        return self.kind if self.patch < 0 else f"{self.kind} {self.patch}"


class Deadlock(RuntimeError):
    """The schedule cannot complete: every unfinished rank waits on another."""


def pipefusion_schedule(stages: int, patches: int) -> list[list[Action]]:
    """The action list of every stage (index = stage = rank on the pipefusion axis)."""
    out = []
    for s in range(stages):
        acts = [Action("POST", j) for j in range(patches)] if s > 0 else []
        for j in range(patches):
            if s > 0:
                acts.append(Action("WAIT", j))
            acts.append(Action("RUN", j))
            if s < stages - 1:
                acts.append(Action("SEND", j))
        if s < stages - 1:
            acts.append(Action("DRAIN"))
        if stages > 1:
            acts.append(Action("BCAST"))
        out.append(acts)
    return out


def speedup_bound(stages: int, patches: int) -> float:
    """Best speedup of a call over one rank (fill and drain in every call, no communication)."""
    return stages * patches / (patches + stages - 1)


def simulate(
    schedule: list[list[Action]], cost: list[float] | None = None
) -> list[dict[int, float]]:
    """Dry-run ``schedule``; returns per rank ``{patch: start time of its RUN}``.

    ``cost[s]``: time of one ``RUN`` on rank ``s`` (default 1). Raises :class:`Deadlock`.
    """
    n = len(schedule)
    cost = cost or [1.0] * n
    pc = [0] * n
    clock = [0.0] * n
    posted: set[tuple[int, int]] = set()  # (receiving rank, patch)
    sent: dict[tuple[int, int], float] = {}  # (receiving rank, patch) -> time the data is there
    starts: list[dict[int, float]] = [{} for _ in range(n)]
    at_bcast: set[int] = set()
    while any(pc[r] < len(schedule[r]) for r in range(n)):
        progress = False
        for r in range(n):
            while pc[r] < len(schedule[r]):
                a = schedule[r][pc[r]]
                if a.kind == "POST":
                    posted.add((r, a.patch))
                elif a.kind == "WAIT":
                    if (r, a.patch) not in sent:
                        break
                    clock[r] = max(clock[r], sent[(r, a.patch)])
                elif a.kind == "RUN":
                    starts[r][a.patch] = clock[r]
                    clock[r] += cost[r]
                elif a.kind == "SEND":
                    if r + 1 >= n or (r + 1, a.patch) not in posted:
                        break  # zero capacity: blocks until the receive is posted
                    sent[(r + 1, a.patch)] = clock[r]
                elif a.kind == "BCAST":
                    at_bcast.add(r)
                    if len(at_bcast) < n:
                        break
                    t = max(clock)
                    clock = [t] * n
                pc[r] += 1
                progress = True
        if not progress:
            stuck = ", ".join(
                f"rank {r}: {schedule[r][pc[r]]}" for r in range(n) if pc[r] < len(schedule[r])
            )
            raise Deadlock(f"schedule deadlocks: {stuck}")
    return starts


def grid(schedule: list[list[Action]], cost: list[float] | None = None) -> str:
    """The schedule as a time-slot x rank table of the patches each stage runs."""
    starts = simulate(schedule, cost)
    slots = sorted({t for per in starts for t in per.values()})
    head = "slot | " + " | ".join(f"stage {r}" for r in range(len(schedule)))
    lines = [head, "-" * len(head)]
    for i, t in enumerate(slots):
        cells = []
        for per in starts:
            js = [j for j, v in per.items() if v == t]
            cells.append(f"{'p' + str(js[0]) if js else '.':>7}")
        lines.append(f"{i:>4} | " + " | ".join(cells))
    return "\n".join(lines)

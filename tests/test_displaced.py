"""PipeFusion and DistriFusion (displaced K/V) on gloo, against the single-process oracle.

The oracle (:mod:`xdit_compile.testing.oracle`) runs the plain diffusers model once per patch with
attention reading K/V as the displaced-K/V semantics say; it shares no code with the compiler.

Tolerances (fp32, relative to max |reference|):
- parallel vs oracle: 1e-5. Both compute the same rows with the same weights and the same K/V;
  only the shapes of the row blocks differ, which may change float summation order (~1e-7).
- parallel vs serial after warmup: more than 1e-3 apart, so a test fails if the stale path
  silently became exact (or diverged: it must still match the oracle). The steps' latents differ
  by a unit of noise, so stale K/V matter.
- warmup steps (and runs whose every step is a warmup step) vs serial: 1e-4 (see test_models_dist).
"""

from __future__ import annotations

import pytest
import torch

from xdit_compile import Plan

ORACLE_TOL, STALE_MIN, EXACT_TOL = 1e-5, 1e-3, 1e-4
#: Joint text: (text in joint attention, text before the image tokens).
TEXT = {
    "pixart-sigma": (False, True),
    "sd3": (True, False),
    "flux-dev": (True, True),
    "hunyuan-dit": (False, True),
    "qwen-image": (True, True),
}


def _inputs(name: str, model, steps: int, uneven: bool = False) -> list[dict]:
    from xdit_compile.models import example_inputs

    kw = example_inputs(name, model, uneven=uneven)
    x0 = kw["hidden_states"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return [dict(kw, hidden_states=x0 + t * noise) for t in range(steps)]


def _oracle(name: str, model, method: str, n: int, warmup: int, kw: dict):
    from xdit_compile.testing.oracle import DisplacedOracle, grid_layout

    joint, first = TEXT[name]
    text = kw["encoder_hidden_states"].shape[1] if joint else 0
    return DisplacedOracle(
        model,
        method,
        grid_layout(getattr(model.config, "patch_size", 1) or 1, n),
        text=text,
        text_first=first,
        warmup_steps=warmup,
    )


def _vs_oracle(
    name: str,
    plan_kw: dict,
    method: str,
    n: int,
    steps: int = 3,
    warmup: int = 1,
    config: dict | None = None,
    uneven: bool = False,
) -> dict:
    """Per step: (error vs oracle, difference from serial); the oracle and serial run first
    (PipeFusion frees other stages' parameters of the model in place)."""
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.models import build_model

    model = build_model(name, "tiny", uneven=uneven, **(config or {}))
    ins = _inputs(name, model, steps, uneven)
    oracle = _oracle(name, model, method, n, warmup, ins[0])
    refs = [oracle(**i) for i in ins]
    with torch.no_grad():
        serial = [model(**i) for i in ins]
    from xdit_compile.runtime.collectives import comm_stats

    pm = xc.parallelize(model, Plan(**plan_kw, warmup_steps=warmup))
    comm_stats().reset()
    outs = [pm(**i) for i in ins]
    comm = set(comm_stats().as_dict())
    pm.reset()  # a new request: the same outputs again
    again = [pm(**i) for i in ins]
    return {
        "oracle": [rel_error(o, r) for o, r in zip(outs, refs, strict=True)],
        "serial": [rel_error(o, s) for o, s in zip(outs, serial, strict=True)],
        "again": [rel_error(a, o) for a, o in zip(again, outs, strict=True)],
        "breaks": len(xc.explain(pm).breaks),
        "comm": comm,
    }


def _check(results: list[dict], warmup: int = 1) -> None:
    for r in results:
        assert r["breaks"] == 0, r
        assert max(r["oracle"]) < ORACLE_TOL, r
        assert max(r["serial"][:warmup]) < EXACT_TOL, r
        assert min(r["serial"][warmup:]) > STALE_MIN, r
        assert max(r["again"]) == 0.0, r


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux-dev", "qwen-image"])
def test_pipefusion_matches_oracle(pools, name):
    _check(pools(2).run(_vs_oracle, name, dict(pipefusion=2, patches=4), "pipefusion", 4))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux-dev", "qwen-image"])
def test_distrifusion_matches_oracle(pools, name):
    _check(pools(2).run(_vs_oracle, name, dict(distrifusion=2), "distrifusion", 2))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_pipefusion_ulysses_matches_oracle(pools, name):
    """pipefusion=2 x ulysses=2: each patch's rows cut over 2 ranks, all-to-alls in attention,
    the buffers hold each rank's heads."""
    results = pools(4).run(
        _vs_oracle, name, dict(pipefusion=2, ulysses=2, patches=2), "pipefusion", 2
    )
    _check(results)
    assert all("all_to_all@ulysses" in r["comm"] for r in results)


@pytest.mark.dist
def test_pipefusion_four_stages_uneven_patches(pools):
    """4 stages of 2 blocks, 3 patches of 8 token rows (3 + 3 + 2: uneven), two warmup steps."""
    results = pools(4).run(
        _vs_oracle,
        "pixart-sigma",
        dict(pipefusion=4, patches=5),
        "pipefusion",
        5,
        steps=4,
        warmup=2,
        config={"num_layers": 8},
    )
    _check(results, warmup=2)


@pytest.mark.dist
def test_pipefusion_relays_skip_connections(pools):
    """HunyuanDiT's long skips (block i's output feeds block L-1-i) cross stages: at 4 stages of
    one block, block 0's output is relayed through stages 1 and 2 to stage 3."""
    _check(
        pools(4).run(
            _vs_oracle,
            "hunyuan-dit",
            dict(pipefusion=4, patches=4),
            "pipefusion",
            4,
            config={"num_layers": 4},
        )
    )


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "flux-dev"])
def test_distrifusion_uneven_rows(pools, name):
    """5 token rows over 2 ranks (3 + 2; Flux: 35 packed tokens, 18 + 17): the K/V pieces are
    padded for the gather and cut back."""
    _check(pools(2).run(_vs_oracle, name, dict(distrifusion=2), "distrifusion", 2, uneven=True))


@pytest.mark.dist
@pytest.mark.parametrize(
    "plan",
    [dict(pipefusion=2, patches=4), dict(distrifusion=2)],
    ids=["pipefusion", "distrifusion"],
)
def test_warmup_on_every_step_equals_serial(pools, plan):
    method = "pipefusion" if "pipefusion" in plan else "distrifusion"
    for r in pools(2).run(
        _vs_oracle, "sd3", plan, method, 4 if "pipefusion" in plan else 2, steps=3, warmup=3
    ):
        assert max(r["serial"]) < EXACT_TOL and max(r["oracle"]) < EXACT_TOL, r


def _poisoned(where: str, rows: slice) -> float:
    """Relative change of the output of step 1 (displaced) when the first layer's buffer rows
    ``rows`` are corrupted at patch 1's ``where`` ("write": before it writes, "read": before
    attention reads)."""
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.models import build_model

    model = build_model("pixart-sigma", "tiny")
    ins = _inputs("pixart-sigma", model, 2)
    pm = xc.parallelize(model, Plan(patches=4))
    clean = [pm(**i) for i in ins][1]
    pm.reset()
    layers: list[str] = []

    def poison(when: str, layer: str, patch: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers.append(layer)
        if when == where and patch == 1 and layer == layers[0]:
            k[..., rows, :] = 1e3
            v[..., rows, :] = -1e3

    assert pm.kv_state is not None
    pm(**ins[0])
    pm.kv_state.poison = poison
    return rel_error(pm(**ins[1]), clean)


@pytest.mark.dist
def test_poisoned_buffer_slices(pools):
    """8x8 tokens in 4 patches of 16 tokens: patch 1 owns rows 16:32 of every buffer."""
    pool = pools(1)
    assert pool.run(_poisoned, "read", slice(32, 64))[0] > 1e-2  # patches > 1: read (stale)
    assert pool.run(_poisoned, "read", slice(0, 16))[0] > 1e-2  # patch 0: read (this step's)
    assert pool.run(_poisoned, "write", slice(16, 32))[0] == 0.0  # its own slice: overwritten first


def _params(plan_kw: dict, config: dict) -> tuple[int, int, int]:
    """(all parameter bytes, block parameter bytes, bytes this rank holds after compiling)."""
    import xdit_compile as xc
    from xdit_compile.compiler.pipefusion import parameter_bytes
    from xdit_compile.models import build_model

    model = build_model("pixart-sigma", "tiny", **config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = sum(p.numel() * p.element_size() for p in model.transformer_blocks.parameters())
    pm = xc.parallelize(model, Plan(**plan_kw))
    pm(**_inputs("pixart-sigma", model, 1)[0])
    return total, blocks, parameter_bytes(pm.pipeline_modules())


@pytest.mark.dist
@pytest.mark.parametrize("n", [2, 4])
def test_pipefusion_parameter_bytes_per_rank(pools, n):
    """Each rank holds 1/N of the block parameters plus the shared modules it uses (measured:
    distinct storages of the model and the compiled pieces after the others were freed)."""
    config = {
        "num_layers": 8,
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "cross_attention_dim": 64,
    }
    for total, blocks, held in pools(n).run(_params, dict(pipefusion=n), config):
        expected = blocks / n + (total - blocks)
        assert abs(held - expected) <= 0.1 * expected, (held, expected, total)
        assert held < total


def _comm(name: str, plan_kw: dict) -> dict:
    """Bytes sent per step at a displaced step (runtime counter) and per explain, with sizes."""
    import xdit_compile as xc
    from xdit_compile.models import build_model
    from xdit_compile.runtime.collectives import comm_stats

    model = build_model(name, "tiny")
    ins = _inputs(name, model, 2)
    pm = xc.parallelize(model, Plan(**plan_kw))
    pm(**ins[0])
    comm_stats().reset()
    out = pm(**ins[1])[0]
    report = xc.explain(pm)
    return {
        "measured": comm_stats().as_dict(),
        "static": report.comm_totals(),
        "out": out.numel(),
        "inner": model.config.num_attention_heads * model.config.attention_head_dim,
        "text": ins[0]["encoder_hidden_states"].shape[1],
        "stage": pm.mesh.info.pipefusion_rank,
    }


def _measured(r: dict) -> dict:
    return {tuple(k.split("@")): (v["calls"], v["bytes"]) for k, v in r["measured"].items()}


@pytest.mark.dist
@pytest.mark.parametrize("patches", [2, 4])
@pytest.mark.parametrize("name", ["pixart-sigma", "flux-dev"])
def test_pipefusion_bytes_closed_form(pools, name, patches):
    """Per step, stage 0 sends each patch's activations once: B*p*hs*4 bytes (plus the text rows,
    with the first patch: B*T*hs*4), whatever M and the number of layers; the last stage
    broadcasts the output once. Static (explain) equals measured."""
    for r in pools(2).run(_comm, name, dict(pipefusion=2, patches=patches)):
        tokens = 64  # 8 x 8 token grid (packed 16 x 16 latent for Flux)
        text = r["text"] if name == "flux-dev" else 0
        if r["stage"] == 0:
            assert _measured(r) == {
                ("send", "pipefusion"): (
                    _measured(r)[("send", "pipefusion")][0],
                    (tokens + text) * r["inner"] * 4,
                )
            }, r
        else:
            assert _measured(r) == {("broadcast", "pipefusion"): (1, r["out"] * 4)}, r
        assert {k: v[1] for k, v in r["static"].items()} == {
            k: v[1] for k, v in _measured(r).items()
        }


@pytest.mark.dist
def test_distrifusion_bytes_closed_form(pools):
    """Per step and layer, each rank sends its K and V pieces to the other rank:
    2*L*B*(p/N)*hs*4*(N-1) bytes, plus the output gather (1/N of the output)."""
    for r in pools(2).run(_comm, "pixart-sigma", dict(distrifusion=2)):
        layers = 2
        kv = 2 * layers * (64 // 2) * r["inner"] * 4
        assert _measured(r) == {
            ("all_gather", "distrifusion"): (layers, kv),
            ("all_gather", "sp"): (1, r["out"] * 4 // 2),
        }
        assert r["static"] == _measured(r)


class _WideBlock(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.unsqueeze(1)
        return x + 0.5 * torch.nn.functional.scaled_dot_product_attention(a, a, a).squeeze(1)


class _Wide(torch.nn.Module):
    """Sixteen tokens of 4M features: one patch of 8 tokens is 134 MB."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_WideBlock(), _WideBlock()])
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states * self.scale
        for b in self.blocks:
            x = b(x)
        return x


def _wide() -> tuple[float, int]:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.runtime.collectives import comm_stats

    torch.manual_seed(0)
    model = _Wide()
    x = torch.randn(1, 16, 1 << 22)
    with torch.no_grad():
        ref = model(hidden_states=x)
    pm = xc.parallelize(model, Plan(pipefusion=2, patches=2))
    comm_stats().reset()
    out = pm(hidden_states=x)  # the first step of a request: exact
    return rel_error(out, ref), comm_stats().total_bytes


@pytest.mark.dist
def test_pipefusion_large_transfers(pools):
    """Stage 0 sends 268 MB in one piece (the warmup step's whole sequence) without hanging
    (xDiT's send/recv hangs above about 64 MB)."""
    (err0, sent0), (err1, _) = pools(2).run(_wide, timeout=600)
    assert sent0 == 16 * (1 << 22) * 4 and max(err0, err1) < EXACT_TOL


@pytest.mark.dist
@pytest.mark.slow
def test_pipefusion_and_distrifusion_inductor(pools):
    """The stage pieces (PipeFusion) and the rewritten graph (DistriFusion) through
    torch.compile: same results as the oracle (inductor's fused kernels: ~1e-6 differences)."""
    for plan, method in (
        (dict(pipefusion=2, patches=2, compile="inductor"), "pipefusion"),
        (dict(distrifusion=2, compile="inductor"), "distrifusion"),
    ):
        _check(pools(2).run(_vs_oracle, "pixart-sigma", plan, method, 2, timeout=900))

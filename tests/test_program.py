"""``compile(graph, plan, mesh, facts) -> Program``: a pure function of the captured graph, typed
and printable, and what the parallel module, the planner and ``explain`` read.

No process group is needed: a :class:`MeshInfo` is the mesh's arithmetic, and a Program compiled
on it is inspected, not run (its collectives would need the groups). Numerics of Programs run on
real groups are the distributed tests' (``test_models_dist``, ``test_displaced``...).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from xdit_compile import Plan
from xdit_compile.analysis.report import program_report
from xdit_compile.compiler.capture import capture
from xdit_compile.compiler.pass_list import build_passes
from xdit_compile.compiler.program import Program, compile
from xdit_compile.models import build_model, example_inputs
from xdit_compile.passes.context import Facts, SeedChoice
from xdit_compile.runtime.displaced import new_state
from xdit_compile.runtime.mesh import MeshInfo


def _captured() -> tuple[torch.nn.Module, dict, fx.GraphModule]:
    model = build_model("pixart-sigma")
    kwargs = example_inputs("pixart-sigma", model)
    return model, kwargs, capture(model, (), kwargs)


def _params(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {
        n: (p.untyped_storage().data_ptr(), p.detach().clone()) for n, p in model.named_parameters()
    }


def test_compile_returns_a_typed_program_and_leaves_the_model_alone() -> None:
    model, kwargs, gm = _captured()
    before = _params(model)
    plan = Plan(ulysses=2)
    prog = compile(gm, plan, MeshInfo.of(plan, 1, key="test_program"), Facts(channels=4))
    assert isinstance(prog, Program) and prog.mesh.rank == 1
    assert [p.name for p in prog.trace] == [p.name for p in build_passes(plan)]
    assert list(prog.graphs) == ["capture", *[p.name for p in build_passes(plan)]]
    assert isinstance(prog.seed, SeedChoice) and prog.seed.arg == "hidden_states"
    # rows of the latent's H, cut in whole patches
    assert sum(prog.seed.split) == kwargs["hidden_states"].shape[2] and prog.seed.dim == 2
    assert prog.seed.patch == model.config.patch_size
    assert prog.breaks == []
    assert {c.op for c in prog.collectives} == {"all_to_all", "all_gather"}
    assert [c.what for c in prog.counted] == ["output"]  # attention ops count their own
    assert prog.serial_flops > 0 and prog.pipefusion is None and prog.kept == []
    assert any(n.target is torch.ops.xdit.usp_attention.default for n in prog.graph.graph.nodes)
    after = _params(model)  # pure: the model's parameters are the same tensors with the same values
    assert before.keys() == after.keys()
    for name, (ptr, val) in before.items():
        assert after[name][0] == ptr and torch.equal(after[name][1], val), name


def test_program_prints_and_reports() -> None:
    model, _, gm = _captured()
    plan = Plan(ulysses=2)
    prog = compile(gm, plan, MeshInfo.of(plan, 0, key="test_program"), Facts(channels=4))
    text = str(prog)
    assert text.startswith(f"Program({plan}, rank 0): {len(prog.trace)} passes, 0 sharding breaks")
    assert "seed: 'hidden_states' dim 2" in text and "pass rewrite_attention" in text
    rep = program_report(prog, model="PixArt", plan=str(plan), param_bytes=0)
    assert rep.collectives == prog.collectives and rep.seed == prog.seed.as_dict()
    assert 0 < rep.flops < rep.serial_flops == prog.serial_flops


def test_distrifusion_keeps_text_rows_whole_once_for_every_caller() -> None:
    """The rule that DistriFusion disables ``shard_text_rows`` lives in ``compile`` (the parallel
    module and the planner both get it), and its displaced-K/V buffers are typed."""
    _, _, gm = _captured()
    plan = Plan(distrifusion=2, warmup_steps=1)
    state = new_state(1)
    prog = compile(
        gm, plan, MeshInfo.of(plan, 0, key="test_program"), Facts(channels=4), state=state
    )
    assert (
        "shard_text_rows" in prog.plan.disable_passes
        and "shard_text_rows" not in plan.disable_passes
    )
    assert prog.displaced and all(b.layer and b.nbytes > 0 for b in prog.displaced)
    node = next(
        n
        for n in prog.graph.graph.nodes
        if n.target is torch.ops.xdit.distrifusion_attention.default
    )
    assert node.args[5] == state.key  # the attention ops read the state the program was given


def test_pipefusion_program_pieces_and_stage_cut() -> None:
    model, _, gm = _captured()
    before = _params(model)
    plan = Plan(pipefusion=2, warmup_steps=1)
    prog = compile(
        gm, plan, MeshInfo.of(plan, 1, key="test_program"), Facts(channels=4), state=new_state(1)
    )
    info = prog.pipefusion
    assert info is not None and (info.stages, info.patches, info.stage) == (2, 2, 1)
    assert prog.stage_cut is not None and sum(prog.stage_cut.counts) == model.config.num_layers
    assert len(prog.pieces) == 2 and prog.kept and prog.out_shapes is not None
    assert prog.counted == []  # PipeFusion's runner counts what it sends
    # Stage 1 runs one of the two blocks: one self-attention layer keeps a buffer of all 8x8
    # image tokens (cross-attention reads text K/V, never stale).
    assert [b.shape[-2] for b in info.buffers] == [64]
    # Pure: the other stage's parameters are still in the model (the parallel module frees them).
    assert all(torch.equal(p.detach(), before[n][1]) for n, p in model.named_parameters())

"""GPU-only paths (run where CUDA exists; the CPU paths they mirror are tested elsewhere)."""

from __future__ import annotations

import pytest
import torch

from xdit_compile.kernels.attention import attention_with_lse

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["cuda_flash", "cuda_efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_lse_backends_match_math(backend, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 300, 64, device="cuda", dtype=dtype, generator=g) for _ in range(3)
    )
    out, lse = attention_with_lse(q, k, v, None, 0.125, backend=backend)
    ref, ref_lse = attention_with_lse(q, k, v, None, 0.125, backend="math")
    # bf16/fp16 inputs: flash kernels accumulate in fp32 but round P to the input dtype.
    assert (out.float() - ref.float()).abs().max() < 2e-2
    assert (lse - ref_lse).abs().max() < 1e-2

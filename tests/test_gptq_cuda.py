"""The CUDA-graph column loop computes what the eager GPTQ loop computes (GPU only; skipped without one)."""

from __future__ import annotations

import pytest
import torch

from pipeline.quant import gptq_cuda
from pipeline.quant.gptq import accumulate_hessian, gptq_quantize


@pytest.mark.gpu
@pytest.mark.parametrize("desc_act", [False, True])
def test_graph_path_equals_eager_path(monkeypatch, desc_act):
    torch.manual_seed(0)
    x = torch.randn(4096, 512, device="cuda") @ torch.randn(512, 512, device="cuda") / 20
    w = torch.randn(384, 512, device="cuda")
    H, _ = accumulate_hessian(None, x, 0)
    assert gptq_cuda.eligible(w, 128, 128, False)
    graphed = gptq_quantize(w, H, bits=4, group_size=128, desc_act=desc_act)
    monkeypatch.setattr(gptq_cuda, "eligible", lambda *a: False)
    eager = gptq_quantize(w, H, bits=4, group_size=128, desc_act=desc_act)
    same = (graphed.w_int == eager.w_int).float().mean().item()
    assert same > 0.999, same
    torch.testing.assert_close(graphed.scales, eager.scales)
    assert torch.equal(graphed.zeros, eager.zeros)
    if desc_act:
        assert torch.equal(graphed.g_idx, eager.g_idx)

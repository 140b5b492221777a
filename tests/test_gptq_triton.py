"""The Triton column loop computes what the eager GPTQ loop computes.

On the CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, numpy arithmetic: bit-exact with the
eager loop); on a GPU the compiled kernel is compared too (a fused multiply-add may flip a code at an exact
rounding tie, so there the codes must agree almost everywhere and the objective to float tolerance)."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import run_interpreted

pytest.importorskip("triton")

from pipeline.quant import gptq_triton  # noqa: E402
from pipeline.quant.gptq import accumulate_hessian, gptq_loss, gptq_quantize  # noqa: E402

CASES = [
    dict(group_size=32),
    dict(group_size=64, desc_act=True),
    dict(group_size=32, desc_act=True, static_groups=True, block_size=64),
    dict(group_size=-1, block_size=32),
    dict(group_size=32, bits=3, sym=False),
]


def _problem(device="cpu", n_out=24, n_in=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / 10
    x[:, :3] *= 30  # a few outlier channels, so act-order and damping matter
    w = torch.randn(n_out, n_in, generator=g)
    H, _ = accumulate_hessian(None, x, 0)
    return w.to(device), H.to(device)


def _eager(monkeypatch, w, H, kw):
    with monkeypatch.context() as m:
        m.setattr(gptq_triton, "eligible", lambda *a: False)
        return gptq_quantize(w, H, **kw)


_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_gptq_triton import CASES, _problem
from pipeline.quant import gptq_triton
from pipeline.quant.gptq import gptq_quantize
w, H = _problem()
out = []
for kw in CASES:
    block = kw.get("block_size", 128) if kw.get("static_groups") or kw["group_size"] == -1 else kw["group_size"]
    assert gptq_triton.eligible(w, block), kw
    got = gptq_quantize(w, H, **kw)
    real = gptq_triton.eligible
    gptq_triton.eligible = lambda *a: False
    ref = gptq_quantize(w, H, **kw)
    gptq_triton.eligible = real
    out.append(dict(kw=kw, codes=torch.equal(got.w_int, ref.w_int), scales=torch.equal(got.scales, ref.scales),
                    zeros=torch.equal(got.zeros, ref.zeros),
                    g_idx=(got.g_idx is None and ref.g_idx is None) or torch.equal(got.g_idx, ref.g_idx)))
print(json.dumps(out))
"""


def test_interpreted_kernel_equals_eager_loop():
    results = run_interpreted(_CHILD)
    assert len(results) == len(CASES)
    for r in results:
        assert r["codes"] and r["scales"] and r["zeros"] and r["g_idx"], r


def test_kernel_is_not_used_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(8, 96)
    assert not gptq_triton.eligible(w, 32)  # CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # eligible() reads it on each call
    assert gptq_triton.eligible(w, 32)
    assert not gptq_triton.eligible(w, 48)  # not a power of two
    assert not gptq_triton.eligible(w, 64)  # does not divide 96


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(group_size=128), dict(group_size=128, desc_act=True, static_groups=True)])
def test_compiled_kernel_matches_eager_loop_on_gpu(monkeypatch, kw):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, H = _problem("cuda", n_out=384, n_in=512)
    got = gptq_quantize(w, H, **kw)
    ref = _eager(monkeypatch, w, H, kw)
    same = (got.w_int == ref.w_int).float().mean().item()
    assert same > 0.999, same
    torch.testing.assert_close(got.scales, ref.scales)
    assert gptq_loss(w, got, H) == pytest.approx(gptq_loss(w, ref, H), rel=1e-3)

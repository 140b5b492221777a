"""The fused fake-quantize kernel computes what ``primitives.fake_quantize`` computes, bit for bit.

On the CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, numpy arithmetic) in a fresh process;
on a GPU the compiled kernel is compared the same way (the kernel has no multiply feeding an add, so no fused
multiply-add can make it differ)."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import run_interpreted

pytest.importorskip("triton")

from pipeline.quant import fake_quant_triton, primitives  # noqa: E402

# (rows, cols, bits, group, sym, clip ratio, column scales?)
CASES = [
    (37, 256, 4, 128, False, 1.0, True),
    (37, 256, 4, 128, True, 1.0, True),
    (64, 192, 4, 64, False, 0.85, False),
    (5, 96, 3, 32, True, 0.6, False),
    (70, 512, 8, 256, False, 1.0, True),
    (33, 64, 4, 16, False, 1.0, True),
    (33, 64, 4, 16, False, 0.95, False),
]


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, 3] *= 40  # an outlier column: its groups get wide ranges
    w[1, :] = 0.0  # an all-zero row: the 1e-8 scale floor
    w[2, :32] = 1e-9  # a tiny group
    w[4, :16] = torch.linspace(-0.4, 0.35, 16)  # values near the rounding ties of a small grid
    s = torch.rand(cols, generator=g) * 3 + 0.05
    return w, s


def _eager(w, s, bits, group, sym, ratio):
    g, scales, zeros = primitives._fit_groups(w if s is None else w * s, bits, group, sym, ratio)
    q = g / scales
    q.round_().add_(zeros).clamp_(0, 2**bits - 1).sub_(zeros).mul_(scales)
    q = q.reshape(w.shape)
    return q if s is None else q.div_(s)


_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_fake_quant_triton import CASES, _eager, _problem
from pipeline.quant import fake_quant_triton, primitives
out = []
for i, (rows, cols, bits, group, sym, ratio, scaled) in enumerate(CASES):
    w, s = _problem(rows, cols, seed=i)
    s = s if scaled else None
    assert fake_quant_triton.eligible(w, group)
    got = (primitives.fake_quantize_scaled(w, s, bits, group, sym) if scaled
           else primitives.fake_quantize(w, bits, group, sym, clip_ratio=ratio))
    ref = _eager(w, s, bits, group, sym, ratio)
    out.append(dict(case=i, equal=torch.equal(got, ref), max_diff=float((got - ref).abs().max())))
print(json.dumps(out))
"""


def test_interpreted_kernel_equals_eager_fake_quantize():
    results = run_interpreted(_CHILD)
    assert len(results) == len(CASES)
    for r in results:
        assert r["equal"], r


def test_the_eager_reference_is_fake_quantize_itself():
    # The test's _eager must be what fake_quantize computes off the kernel (a CPU tensor, no interpreter).
    w, s = _problem(8, 128)
    assert torch.equal(primitives.fake_quantize_scaled(w, s, 4, 64), _eager(w, s, 4, 64, False, 1.0))
    assert torch.equal(primitives.fake_quantize(w, 4, 32, True, 0.9), _eager(w, None, 4, 32, True, 0.9))


def test_kernel_is_not_used_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(8, 96)
    assert not primitives._fused(w, 32)  # CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fake_quant_triton.eligible(w, 32)
    assert not fake_quant_triton.eligible(w, 48)  # not a power of two
    assert not fake_quant_triton.eligible(w, 64)  # does not divide 96
    assert not fake_quant_triton.eligible(w.half(), 32)  # fp32 only
    assert not fake_quant_triton.eligible(w.t(), 8)  # not contiguous


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_kernel_equals_eager_on_gpu(monkeypatch, case):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows, cols, bits, group, sym, ratio, scaled = CASES[case]
    w, s = _problem(rows * 8, cols, seed=case)
    w, s = w.cuda(), (s.cuda() if scaled else None)
    got = (primitives.fake_quantize_scaled(w, s, bits, group, sym) if scaled
           else primitives.fake_quantize(w, bits, group, sym, clip_ratio=ratio))
    assert torch.equal(got, _eager(w, s, bits, group, sym, ratio))

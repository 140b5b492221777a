"""The split-K decode attention kernel (pipeline/serve/decode_attention_triton.py) under Triton's interpreter on
the CPU (float16, against a float64 reference), and on a GPU against the two-product path (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_interpreted

CHILD = r"""
import json, torch
from pipeline.serve import decode_attention_triton as dat

def reference(q, k, v, keep, scale):  # q [b, hkv, g, d], k/v [b, hkv, L, d], keep [b, L]
    s = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * scale
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", torch.softmax(s, -1), v.double())

torch.manual_seed(0)
_empty = torch.empty
torch.empty = lambda *a, **kw: _empty(*a, **kw).fill_(float("nan"))  # scratch the kernels must not read unwritten
worst = []
# (batch, kv heads, group, head dim, cache length, kept lengths per row): ragged rows, a row whose only kept
# positions are far apart (a hole of whole blocks), lengths that end inside a block, one group of 1 (MHA), one
# of 6 (not a power of two).
for b, hkv, g, d, L, lens in [(3, 2, 4, 64, 600, [1, 300, 600]), (2, 1, 1, 32, 256, [256, 17]),
                              (1, 2, 6, 128, 512, [200]), (2, 2, 4, 64, 2048, [2048, 3])]:
    q = torch.randn(b, hkv, g, d).half()
    k = torch.randn(b, hkv, L, d).half()
    v = torch.randn(b, hkv, L, d).half()
    keep = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
    if b == 3:
        keep[0, 560] = True  # row 0: positions 0 and 560 only, block 1 (256..511) empty between them
    out = dat.decode_attention(q, k, v, keep[:, None, None, :], d ** -0.5)
    ref = reference(q, k, v, keep, d ** -0.5)
    assert out.dtype == torch.float16 and out.shape == q.shape
    worst.append(((out.double() - ref).abs().max() / ref.abs().max()).item())
print(json.dumps(worst))
"""


def test_split_k_kernel_matches_float64_under_the_interpreter():
    worst = run_interpreted(CHILD)
    assert len(worst) == 4 and max(worst) < 3e-3, worst  # float16 inputs and output


def test_eligibility():
    from pipeline.serve import decode_attention_triton as dat

    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)
    keep = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    assert not dat.eligible(q, k, keep)  # CPU tensors, no interpreter: the two products run
    if torch.cuda.is_available():
        qc, kc = q.cuda(), k.cuda()
        assert dat.eligible(qc, kc, keep.cuda()) == dat.available()
        assert not dat.eligible(qc, kc, None) and not dat.eligible(qc, kc, keep.float().cuda())
        assert not dat.eligible(qc.float(), kc.float(), keep.cuda())  # fp32: the two products


@pytest.mark.gpu
def test_kernel_agrees_with_the_two_products_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from types import SimpleNamespace

    from pipeline.serve import decode_attention as da
    from pipeline.serve import decode_attention_triton as dat

    dat.custom_op()  # install() registers it where the server uses it
    torch.manual_seed(1)
    module = SimpleNamespace(num_key_value_groups=4, config=None)
    q = torch.randn(3, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(3, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    keep = (torch.arange(4096, device="cuda")[None, :] <= torch.tensor([0, 1000, 4095], device="cuda")[:, None])
    mask = keep[:, None, None, :]
    try:
        da.KERNEL = "matmul"
        ref, _ = da.decode_attention(module, q, k, v, mask)
    finally:
        da.KERNEL = "auto"
    out, _ = da.decode_attention(module, q, k, v, mask)
    assert out.shape == ref.shape == (3, 1, 32, 128)
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 2e-2

"""Fast low-bit decode: our Triton INT4 kernels against the dequantize reference (CPU, through Triton's
interpreter in a subprocess), the Int4Linear routing on CUDA, and GraphedDecoder's static cache against
transformers' own greedy generation (CPU: the same step code, eagerly; CUDA: graphs, marked gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-llama-pydocs"

_CHILD = r"""
import json, torch
from pipeline.engines import int4_triton as it
torch.manual_seed(0)
out = []
for m, n, k, group, cfg in [
    (1, 48, 256, 64, dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),
    (1, 40, 512, 128, dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=4)),   # ragged N, split-K atomics
    (3, 40, 256, 128, dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)),    # M padded to the 4-row block
    (8, 32, 512, 32, dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)),
]:
    q = torch.randint(0, 16, (n, k))
    s = (torch.rand(n, k // group) + 0.5).half().float()
    z = torch.randint(0, 16, (n, k // group))
    w = ((q.reshape(n, -1, group) - z[..., None]).float() * s[..., None]).reshape(n, k)
    t = it.repack(q, s, z, "cpu")
    x = torch.randn(m, k)
    y = it.gemv(x, t, group, cfg)
    ref = x.double() @ w.double().t()
    unwritten = torch.full((m, n), float("nan"))
    out.append(dict(m=m, n=n, k=k, rel=((y.double() - ref).norm() / ref.norm()).item(),
                    finite=bool(torch.isfinite(y).all()), shape=list(y.shape),
                    dequant_equal=torch.equal(it.dequantize(t, group, torch.float32), w),
                    config_ok=it.config_ok(cfg, k, group), scales_fp16=t["scales_t"].dtype == torch.float16))
print(json.dumps(out))
"""


def test_triton_int4_kernels_match_the_dequantized_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        # float32 accumulation of s * (sum q x - z sum x) against float64 sum (q - z) s x
        assert r["finite"] and r["shape"] == [r["m"], r["n"]] and r["rel"] < 1e-5, r
        assert r["dequant_equal"] and r["config_ok"] and r["scales_fp16"], r


def test_repack_puts_code_8i_plus_j_in_nibble_j_of_word_i():
    from pipeline.engines.int4_triton import repack

    q = torch.arange(16).repeat(2, 1)  # [2, 16]
    t = repack(q, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), "cpu")
    words = t["qweight"]
    for i in range(2):
        for j in range(8):
            assert (int(words[0, i]) >> (4 * j)) & 15 == 8 * i + j
    assert t["scales_t"].shape == (1, 2) and t["zeros_t"].dtype == torch.uint8


def test_config_ok_rejects_tiles_that_straddle_groups_or_splits():
    from pipeline.engines.int4_triton import config_ok

    assert config_ok(dict(BLOCK_K=128, SPLIT_K=1), 4096, 128)
    assert not config_ok(dict(BLOCK_K=256, SPLIT_K=1), 4096, 128)  # a tile over two groups
    assert not config_ok(dict(BLOCK_K=128, SPLIT_K=3), 4096, 128)  # K not cut into whole groups


def test_triton_kernel_needs_cuda_and_four_bits():
    from pipeline.engines.qlinear import KERNEL_TRITON, Int4Linear
    from pipeline.quant.primitives import QuantizedWeight

    qw = QuantizedWeight(torch.randint(0, 16, (16, 64), dtype=torch.int32), torch.rand(16, 2),
                         torch.randint(0, 16, (16, 2), dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Int4Linear(qw, kernel=KERNEL_TRITON)
    assert Int4Linear(qw).kernel != KERNEL_TRITON  # auto on the CPU: the CPU paths


def test_int4_route_picks_the_gemv_for_one_token_and_the_dequant_matmul_above_its_threshold():
    """qlinear.int4_route, shared by Int4Linear and the merged serve-time products: one token on the GEMV where
    it is built; prefill (above 8 tokens) dequantize + matmul; cuda-triton always; PyTorch's kernel otherwise."""
    from pipeline.engines.qlinear import _GEMV_ROWS, int4_route

    assert int4_route(1, True, _GEMV_ROWS) == "gemv"
    assert int4_route(1, False, _GEMV_ROWS) == "packed"  # no GEMV built (CPU, or it did not compile)
    assert int4_route(_GEMV_ROWS, True, _GEMV_ROWS) == "packed"
    assert int4_route(_GEMV_ROWS + 1, True, _GEMV_ROWS) == "dequant-matmul"
    assert int4_route(1, False, 0) == "dequant-matmul"  # kernel="cuda-triton": every token count
    assert int4_route(512, False, None) == "packed"  # the CPU: PyTorch's kernel at any length


def _greedy_reference(model, prompt, new):
    out = model.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _graphed_greedy(dec, prompts, new):
    nxt = [int(dec.prefill(slot, p).argmax()) for slot, p in enumerate(prompts)]
    got = [[t] for t in nxt]
    for _ in range(new - 1):
        nxt = dec.step(torch.tensor(nxt)).argmax(-1).tolist()
        for g, t in zip(got, nxt):
            g.append(t)
    return got


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def test_static_cache_decoder_matches_transformers_greedy_for_ragged_slots(tiny_model):
    from pipeline.serve.cuda_graphs import GraphedDecoder

    prompts = [torch.tensor([1, 5, 9, 22, 40, 7, 11]), torch.tensor([1, 7, 3]), torch.tensor([1, 300])]
    ref = [_greedy_reference(tiny_model, p, 6) for p in prompts]
    dec = GraphedDecoder(tiny_model, max_batch=4, max_len=32)
    assert dec.buckets == [1, 2, 4] and not dec.graphs_enabled
    assert _graphed_greedy(dec, prompts, 6) == ref
    # compaction: slot 2's sequence moved to slot 0 continues exactly
    dec2 = GraphedDecoder(tiny_model, max_batch=4, max_len=32)
    first = int(dec2.prefill(2, prompts[0]).argmax())
    dec2.move_slot(2, 0)
    dec2.release(2)
    toks = [first]
    for _ in range(5):
        toks.append(int(dec2.step(torch.tensor([toks[-1]])).argmax(-1)[0]))
    assert toks == ref[0]


def test_decoder_rejects_bad_slots_batches_and_models(tiny_model):
    from pipeline.errors import StageError
    from pipeline.serve.cuda_graphs import GraphedDecoder

    dec = GraphedDecoder(tiny_model, max_batch=2, max_len=8)
    with pytest.raises(StageError, match="slot"):
        dec.prefill(2, torch.tensor([1, 2]))
    with pytest.raises(StageError, match="tokens"):
        dec.prefill(0, torch.arange(8))
    with pytest.raises(StageError, match="1..2 tokens"):
        dec.step(torch.tensor([1, 2, 3]))
    with pytest.raises(StageError, match="Llama-style"):
        GraphedDecoder(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int4_triton_linear_and_graphed_decoder_on_gpu(tiny_model):
    from pipeline.engines.qlinear import KERNEL_CUDA, KERNEL_TRITON, Int4Linear
    from pipeline.quant.primitives import QuantizedWeight
    from pipeline.serve.cuda_graphs import GraphedDecoder

    for n, k, group in [(256, 512, 128), (1024, 4096, 128), (96, 256, 32)]:
        qw = QuantizedWeight(torch.randint(0, 16, (n, k), dtype=torch.int32), (torch.rand(n, k // group) + .5) / 64,
                             torch.randint(0, 16, (n, k // group), dtype=torch.int32), 4, group)
        auto = Int4Linear(qw, device="cuda", dtype=torch.bfloat16)
        assert auto.kernel == KERNEL_CUDA and auto.prefill_dequant  # tinygemm decode, dequantize + cuBLAS prefill
        triton = Int4Linear(qw, device="cuda", dtype=torch.bfloat16, kernel=KERNEL_TRITON)
        for lin in (auto, triton):
            for m in (1, 3, 8, 40):  # packed GEMV up to 8 rows, dequantize + cuBLAS above
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ qw.dequantize().cuda().double().t()
                y = lin(x).double()
                assert ((y - ref).norm() / ref.norm()).item() < 1e-2, (lin.kernel, m)
    model = tiny_model.to("cuda", torch.bfloat16)
    prompts = [torch.tensor([1, 5, 9, 22, 40]), torch.tensor([1, 7, 3])]
    eager = _graphed_greedy(GraphedDecoder(model, max_batch=2, max_len=32, graphs=False), prompts, 6)
    graphed = _graphed_greedy(GraphedDecoder(model, max_batch=2, max_len=32), prompts, 6)
    assert graphed == eager
    tiny_model.to("cpu", torch.float32)

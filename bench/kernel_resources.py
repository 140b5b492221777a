"""Registers, spills and shared memory of our GPU kernels compiled for a given architecture (default sm_90, the
H200's), on any machine: no GPU needed. Prints a table, writes JSON.

- the one-token INT4 GEMV variants (``pipeline/engines/int4_cuda.py``) through NVRTC and ptxas, from PyPI's
  ``nvidia-cuda-nvrtc-cu12`` and ``nvidia-cuda-nvcc-cu12`` wheels (``pip install nvidia-cuda-nvrtc-cu12
  nvidia-cuda-nvcc-cu12`` into this environment; the GPU machine's PyTorch compiles the same source with its own
  NVRTC at load);
- the split-K decode attention (``pipeline/serve/decode_attention_triton.py``) through Triton's own compiler and
  its bundled ptxas / cuobjdump, for head dim 128 and 16 query rows, at several block sizes and warp counts.

This is how the launch shapes (4 rows a chunk: 96 registers, against 128 for 8) and the attention's 128-position
blocks with 8 warps (256 with 4 spilled ~4.9 KB a thread) were chosen; bench/RESULTS.md has the timings.

    python bench/kernel_resources.py --out bench/results_kernel_resources_sm90.json
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _nvidia_file(package: str, pattern: str) -> str | None:
    try:
        mod = __import__(f"nvidia.{package}", fromlist=["_"])
    except ImportError:
        return None
    hits = sorted(glob.glob(os.path.join(list(mod.__path__)[0], pattern)))
    return hits[0] if hits else None


def _nvrtc_ptx(lib, source: str, arch: int) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    if rc:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.value.decode()[:500])
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, buf)
    return buf.value.decode()


def _ptxas_usage(ptxas: str, ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        err = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", str(path), "-o", os.devnull], capture_output=True,
                             text=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    stack = re.search(r"(\d+) bytes stack frame", err)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None,
                stack_bytes=int(stack.group(1)) if stack else None)


def gemv_variants(arch: int) -> list[dict]:
    from pipeline.engines import int4_cuda

    nvrtc = _nvidia_file("cuda_nvrtc", "lib/libnvrtc.so*")
    ptxas = _nvidia_file("cuda_nvcc", "bin/ptxas")
    if not (nvrtc and ptxas):
        print("INT4 GEMV: needs nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 (pip); skipped")
        return []
    lib = ctypes.CDLL(nvrtc)
    rows = []
    for k in (4096, 14336, 28672):
        for norm, epilogue in ((False, ""), (False, "residual"), (True, ""), (True, "swiglu"), (True, "rope")):
            for r, depth in ((r, d) for r in ((2,) if k > int4_cuda.WIDE_K else int4_cuda.ROWS) for d in (1, 2)):
                if depth == 2 and int4_cuda.ahead(k, r) == 1:
                    continue
                source, name = int4_cuda._variant(torch.bfloat16, k, r, norm, epilogue, depth)
                use = _ptxas_usage(ptxas, _nvrtc_ptx(lib, source, arch), arch)
                rows.append(dict(kernel=name, k=k, threads=int4_cuda.threads_per_block(k), **use))
    from pipeline.engines import int4_mma

    tiles, warps = int4_mma.shape(0, 0)  # the block shape Int4Linear launches (the same for every width)
    for seg in (1, 2, 4, 8):  # the tensor-core product of 2-16 tokens: groups of 16, 32, 64, 128+; 8 and 16 tokens
        for hi in (False, True):
            source, name = int4_mma._variant(seg, hi, tiles, warps)
            use = _ptxas_usage(ptxas, _nvrtc_ptx(lib, source, arch), arch)
            rows.append(dict(kernel=name, k=None, threads=32 * warps, **use))
    return rows


def attention_variants(arch: int) -> list[dict]:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        print("decode attention: needs triton; skipped")
        return []
    from pipeline.serve import decode_attention_triton as dat

    partial, _ = dat._kernels(False)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sig = {name: "i32" for name in ("HKV", "G", "L", "S", "sq_b", "sq_h", "sq_g", "sk_b", "sk_h", "sk_l", "sv_b",
                                    "sv_h", "sv_l", "sm_b")}  # fmt: skip
    sig.update(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", mask_ptr="*i1", m_ptr="*fp32", l_ptr="*fp32",
               acc_ptr="*fp32", scale="fp32", D="constexpr", BLOCK_G="constexpr", BLOCK="constexpr",
               PDL="constexpr")
    rows = []
    for block in (64, 128, 256):
        for warps in (4, 8):
            constexprs = {"D": 128, "BLOCK_G": 16, "BLOCK": block, "PDL": True}  # as launched on the H200
            kern = triton.compile(ASTSource(partial, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "launch_pdl": True})  # fmt: skip
            with tempfile.TemporaryDirectory() as d:
                cubin = Path(d) / "k.cubin"
                cubin.write_bytes(kern.asm["cubin"])
                out = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
            rows.append(dict(kernel="_partial", block=block, warps=warps,
                             registers=int(regs.group(1)) if regs else None,
                             stack_bytes=int(stack.group(1)) if stack else None,
                             chosen=block == dat.BLOCK_L and warps == dat.PARTIAL_WARPS))  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = dict(arch=f"sm_{a.arch}", gemv=gemv_variants(a.arch), attention=attention_variants(a.arch))
    print(f"\n| kernel (sm_{a.arch}) | K | threads | registers | stack bytes | spill stores |")
    print("|---|---|---|---|---|---|")
    for r in res["gemv"]:
        print(f"| {r['kernel']} | {r['k']} | {r['threads']} | {r['registers']} | {r['stack_bytes']} | "
              f"{r['spill_store_bytes']} |")
    for r in res["attention"]:
        mark = " (used)" if r["chosen"] else ""
        print(f"| decode attention, {r['block']} positions{mark} | | {32 * r['warps']} | {r['registers']} | "
              f"{r['stack_bytes']} | |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

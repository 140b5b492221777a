"""Launching our NVRTC kernels (``torch.cuda._compile_kernel``) with programmatic dependent launch (PDL).

In a CUDA graph the decode step is ~200 kernels in a row, and each waits for the one before it to finish and
its memory to be flushed before its first block starts: a chain of trivial kernels costs ~2 us each on the H200,
and every kernel adds its ramp-up and tail at a fraction of the bandwidth. With PDL (Hopper and later) a kernel
is launched while the one before it still runs: its blocks start as the earlier kernel's blocks leave the SMs,
issue the loads that depend on nothing earlier (the weights), and wait in ``griddepcontrol.wait`` until the
earlier kernel has completed and its writes are visible; a kernel signals with ``griddepcontrol.launch_dependents``
that the next may start. ``GRID_SYNC`` is the CUDA C both take; Triton kernels use ``tl.extra.cuda.gdc_wait`` and
``launch_pdl=True``.

Measured on the H200 (bench/RESULTS.md, 2026-12-01): an 8B layer's four INT4 GEMVs in a graph 47.5-48.0 us
against 50.7-51.3 with plain launches; decode at batch 1 436-466 tok/s against 408-435. The trigger comes first:
with the wait first (the next kernel launched only once this one's wait returned) there was no gain at all.

The rule that keeps it correct: a kernel launched with PDL reads nothing a kernel before it writes, and writes
nothing, before its wait; every one of its threads passes the wait, so it cannot complete before the kernel
before it has (which makes the chain transitive for kernels further on).

Why by hand: PyTorch's ``_CudaKernel.__call__`` launches through ``cuLaunchKernel``, which takes no launch
attributes; ``cuLaunchKernelEx`` is called here through ctypes with the driver's own structs (cuda.h, CUDA 12+).
"""

from __future__ import annotations

import ctypes
import functools

import torch

PDL = True  # launch with PDL where the GPU and driver have it (bench/decode_speed.py's "-nopdl" turns it off)

# The device side: both are no-ops before sm_90 and in a kernel launched without PDL.
GRID_SYNC = r"""
__device__ __forceinline__ void grid_wait() {  // the kernel before this one has completed; its writes are visible
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_launch_next() {  // the next kernel may be launched
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
"""

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: the id, padding to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def kernel_args(args: list) -> tuple[ctypes.Array, list]:
    """``args`` as the driver takes them (tensors as pointers, ints as C int, floats as C double, as PyTorch's own
    launcher converts them): the void* array, and the ctypes values it points at (keep them alive)."""
    values: list = []
    for a in args:
        if isinstance(a, torch.Tensor):
            values.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"kernel argument of type {type(a).__name__} (tensor, int or float)")
        else:
            values.append(ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a))
    array = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    return array, values


def launch_config(grid, block, stream_handle: int, pdl: bool) -> tuple[_LaunchConfig, ctypes.Array]:
    """The ``CUlaunchConfig`` of one launch (with the PDL attribute if ``pdl``) and its attribute array."""
    attrs = (_LaunchAttribute * 1)()
    attrs[0].id, attrs[0].value = _PROGRAMMATIC_STREAM_SERIALIZATION, 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0, ctypes.c_void_p(stream_handle),
                           attrs, 1 if pdl else 0)
    return config, attrs


@functools.cache
def _launch_ex():
    lib = torch.cuda._utils._get_gpu_runtime_library()
    try:
        return lib.cuLaunchKernelEx
    except AttributeError:  # a driver before CUDA 12
        return None


@functools.cache
def pdl_available(index: int) -> bool:
    """PDL on this device: compute capability 9.0 or later, a driver with ``cuLaunchKernelEx``, not ROCm."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0) and _launch_ex() is not None


def launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch ``kernel`` (a ``torch.cuda._compile_kernel`` result whose source waits with ``grid_wait`` before it
    reads or writes anything earlier kernels touch) on the current stream, with PDL where :func:`pdl_available`
    and :data:`PDL` say so, else through PyTorch's own launcher."""
    index = torch.cuda.current_device()
    if not (PDL and pdl_available(index)):
        kernel(grid=grid, block=block, args=args)
        return
    params, _values = kernel_args(args)  # the values params points at live until the call returns
    config, _attrs = launch_config(grid, block, torch.cuda.current_stream().cuda_stream, pdl=True)
    rc = _launch_ex()(ctypes.byref(config), kernel.func, params, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {rc} (programmatic dependent launch)")

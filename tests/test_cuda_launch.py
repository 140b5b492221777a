"""The ctypes side of programmatic dependent launch (pipeline.engines.cuda_launch): the driver's structs laid out
as cuda.h lays them out, and the kernel arguments converted as PyTorch's own launcher converts them. The launch
itself runs in tests/test_int4_cuda.py on a GPU."""

from __future__ import annotations

import ctypes

import pytest
import torch

from pipeline.engines import cuda_launch


def test_launch_structs_match_cuda_h():
    # cuda.h (CUDA 12+): CUlaunchAttribute = an enum id, padding to 8, a 64-byte value union; CUlaunchConfig =
    # seven unsigned ints, the stream and attribute pointers (8-aligned), the attribute count
    assert ctypes.sizeof(cuda_launch._LaunchAttribute) == 72
    assert cuda_launch._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(cuda_launch._LaunchConfig) == 56
    assert (cuda_launch._LaunchConfig.stream.offset, cuda_launch._LaunchConfig.attrs.offset,
            cuda_launch._LaunchConfig.num_attrs.offset) == (32, 40, 48)  # fmt: skip
    config, attrs = cuda_launch.launch_config((7, 1, 1), (128, 1, 1), 0xABC, pdl=True)
    assert list(config.grid) == [7, 1, 1] and list(config.block) == [128, 1, 1] and config.stream == 0xABC
    assert config.num_attrs == 1 and (attrs[0].id, attrs[0].value) == (6, 1)  # programmatic stream serialization
    assert cuda_launch.launch_config((1, 1, 1), (32, 1, 1), 0, pdl=False)[0].num_attrs == 0


def test_kernel_args_are_pointers_c_ints_and_doubles():
    t = torch.zeros(4)
    array, values = cuda_launch.kernel_args([t, 3, 0.5])
    assert len(array) == 3
    assert ctypes.cast(array[0], ctypes.POINTER(ctypes.c_void_p)).contents.value == t.data_ptr()
    assert ctypes.cast(array[1], ctypes.POINTER(ctypes.c_int)).contents.value == 3
    assert ctypes.cast(array[2], ctypes.POINTER(ctypes.c_double)).contents.value == 0.5
    with pytest.raises(TypeError, match="bool"):
        cuda_launch.kernel_args([True])

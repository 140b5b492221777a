"""AWQ GEMM packing: round trips, the nibble order on paper, and the config that loaders parse."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import QuantizationError
from pipeline.formats import awq_gemm
from pipeline.quant.primitives import QuantizedWeight


def random_qweight(out_features: int, in_features: int, group_size: int, seed: int = 0) -> QuantizedWeight:
    """Random 4-bit codes, zeros in [0, 15] and fp16-representable positive scales."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return QuantizedWeight(
        w_int=torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32),
        scales=(torch.rand(out_features, groups, generator=g) * 0.1 + 1e-3).half().float(),
        zeros=torch.randint(0, 16, (out_features, groups), generator=g, dtype=torch.int32),
        bits=4,
        group_size=group_size,
    )


@pytest.mark.parametrize("shape", [(8, 128, 128), (64, 256, 32), (48, 384, 128), (16, 64, 64), (768, 256, 128)])
def test_pack_unpack_round_trip_is_bit_exact(shape):
    out_features, in_features, group_size = shape
    qw = random_qweight(out_features, in_features, group_size, seed=out_features + in_features)
    packed = awq_gemm.pack(qw)
    assert packed["qweight"].dtype == torch.int32 and tuple(packed["qweight"].shape) == (in_features, out_features // 8)
    groups = in_features // group_size
    assert packed["qzeros"].dtype == torch.int32 and tuple(packed["qzeros"].shape) == (groups, out_features // 8)
    assert packed["scales"].dtype == torch.float16 and tuple(packed["scales"].shape) == (groups, out_features)
    back = awq_gemm.unpack(packed["qweight"], packed["qzeros"], packed["scales"], group_size)
    assert torch.equal(back.w_int, qw.w_int)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)
    assert back.group_size == group_size and back.bits == 4
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_nibble_order_known_value():
    # One input row, outputs 0..7 hold codes 1..8. Slot i (bits 4i..4i+3) holds column (0,2,4,6,1,3,5,7)[i], so the
    # nibbles from the least significant are 1,3,5,7,2,4,6,8: 0x86427531 = 2252502321, as int32 2252502321 - 2**32.
    qw = QuantizedWeight(
        w_int=torch.arange(1, 9, dtype=torch.int32).reshape(8, 1),
        scales=torch.ones(8, 1),
        zeros=torch.zeros(8, 1, dtype=torch.int32),
        bits=4,
        group_size=1,
    )
    packed = awq_gemm.pack(qw)
    assert packed["qweight"].tolist() == [[2252502321 - 2**32]]
    assert packed["qzeros"].tolist() == [[0]]
    # Only column 1 set to 15: it sits in slot 4, bits 16..19 -> 0x000F0000.
    qw.w_int = torch.zeros(8, 1, dtype=torch.int32)
    qw.w_int[1, 0] = 15
    qw.zeros[1, 0] = 9
    packed = awq_gemm.pack(qw)
    assert packed["qweight"].tolist() == [[0x000F0000]]
    assert packed["qzeros"].tolist() == [[9 << 16]]


def test_packed_tensors_decode_like_turbomind_and_autoawq():
    # An independent decoder written from the loaders' description: TurboMind's _unpack_awq_gemm takes nibbles LSB
    # first and reorders them with [0, 4, 1, 5, 2, 6, 3, 7]; AutoAWQ's dequantize_gemm is (iw - iz) * scales with the
    # group rows repeated group_size times.
    qw = random_qweight(32, 256, 64, seed=3)
    p = awq_gemm.pack(qw)

    def decode(x):
        nibbles = [(x >> (4 * i)) & 15 for i in range(8)]
        return torch.stack([nibbles[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)], dim=-1).reshape(x.shape[0], -1)

    iw, iz = decode(p["qweight"]), decode(p["qzeros"])
    assert torch.equal(iw, qw.w_int.t())
    assert torch.equal(iz, qw.zeros.t())
    w_kn = (iw - iz.repeat_interleave(64, dim=0)).float() * p["scales"].float().repeat_interleave(64, dim=0)
    assert torch.equal(w_kn.t(), qw.dequantize())


def test_only_4_bit_is_awq_gemm():
    qw = random_qweight(8, 64, 64)
    qw.bits = 8
    with pytest.raises(QuantizationError, match="4-bit"):
        awq_gemm.pack(qw)
    with pytest.raises(QuantizationError, match="8-bit"):
        awq_gemm.quantization_config(8, 128)


def test_pack_rejects_widths_the_layout_cannot_hold():
    with pytest.raises(QuantizationError, match="12 outputs, not a multiple of 8"):
        awq_gemm.pack(random_qweight(12, 64, 64))
    qw = random_qweight(8, 64, 32)
    qw.g_idx = torch.randperm(64) // 32
    with pytest.raises(QuantizationError, match="g_idx"):
        awq_gemm.pack(qw)


def test_unpack_rejects_a_group_size_that_disagrees_with_the_shapes():
    p = awq_gemm.pack(random_qweight(16, 256, 128))
    with pytest.raises(QuantizationError, match="group size 64"):
        awq_gemm.unpack(p["qweight"], p["qzeros"], p["scales"], 64)


def test_quantization_config_is_what_autoawq_writes_and_transformers_parses():
    from transformers import AwqConfig

    cfg = awq_gemm.quantization_config(4, 128)
    assert cfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    parsed = AwqConfig.from_dict(dict(cfg))
    assert (parsed.bits, parsed.group_size, parsed.zero_point) == (4, 128, True)
    assert str(parsed.to_dict()["version"]).lower().endswith("gemm")
    assert awq_gemm.read_quantization_config(cfg) == (4, 128)
    with pytest.raises(QuantizationError, match="GEMM"):
        awq_gemm.read_quantization_config({**cfg, "version": "gemv"})

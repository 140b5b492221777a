"""Grouped-query attention for one query token per sequence, without copying the cache per query head.

transformers' ``sdpa`` attention runs a masked grouped-query decode by ``repeat_kv``: it expands the whole key
and value cache to every query head before ``scaled_dot_product_attention`` (5.24 packs the query instead, but
not under ``torch.compile``, which is how the static-cache step runs). With our static cache of ``max_len``
positions that is, for Llama-3-8B at 4096 positions, 64 MB written and read again per layer and token, about
4.6 GB a token: a third of bf16's weight bytes and more than INT4's. Here the query is reshaped instead,
``[b, H, 1, d] -> [b, H_kv, H / H_kv, d]``, so each key/value head serves its group of query heads as a short
query sequence, and the ``[b, 1, 1, L]`` mask broadcasts over both; the result is the same attention (head
``h = kv * groups + r``, the order ``repeat_kv`` makes). The products are two batched matrix products (scores
in the cache dtype, softmax in float32, as transformers' eager attention), not ``scaled_dot_product_attention``:
for one query per head group the fused attention kernels parallelise over queries and heads only. On the H200,
through ``scaled_dot_product_attention`` (cuDNN's flash kernel), a 4096-position cache (the server's default
``max_len``) made a bf16 Llama-3-8B step at batch 1 2.4 ms slower than a 104-position one (121 against 170
tok/s), ~75 us a layer, where reading the cache once takes ~4 us; two matrix products read it once. On CUDA,
with the static cache's boolean mask, :mod:`pipeline.serve.decode_attention_triton` goes further: a split-K kernel
that reads only the key blocks the mask keeps (``KERNEL = "matmul"`` keeps the two products).

:func:`install` registers it with transformers' ``AttentionInterface`` and sets it on the model's config; every
other call (prefill, no grouping, a per-head mask) goes to the implementation the model had before.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.serve import decode_attention_triton

NAME = "quantship_decode_gqa"
KERNEL = "auto"  # "auto": the Triton split-K kernel where eligible (CUDA, bool mask); "matmul": the two products
# ("skip", bench/decode_speed.py's "-noattn" only: no attention at all, a wrong result, to time what remains)
_PREVIOUS: dict[int, str] = {}  # id(config) -> the attention implementation it had before install


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    plain = q_len == 1 and mask_ok and not dropout and kwargs.get("softcap") is None
    scale = d**-0.5 if scaling is None else scaling
    if plain and KERNEL == "skip":  # the bench's diagnostic ("-noattn"): q passed through, to time the rest
        return query.transpose(1, 2).contiguous(), None
    if plain and KERNEL == "auto" and decode_attention_triton.eligible(query, key, attention_mask):
        q = query.reshape(b, key.shape[1], heads // key.shape[1], d)
        out = torch.ops.quantship.decode_attention(q, key, value, attention_mask, scale)  # skips masked blocks
        return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None
    if not plain or groups == 1:
        return _previous(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    q = query.reshape(b, key.shape[1], groups, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, H_kv, groups, d]
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def _previous(module: Any):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREVIOUS.get(id(getattr(module, "config", None)), "sdpa")
    if name == "eager":
        import importlib

        modeling = importlib.import_module(type(module).__module__)
        return modeling.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def install(model: Any) -> bool:
    """Route ``model``'s attention through :func:`decode_attention` (idempotent); False where the model's config
    has no ``_attn_implementation`` to set, or its current one is not one we can fall back to."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = getattr(model, "config", None)
    current = getattr(cfg, "_attn_implementation", None)
    if cfg is None or current is None:
        return False
    if current == NAME:
        return True
    if current != "eager" and current not in ALL_ATTENTION_FUNCTIONS:
        return False
    AttentionInterface.register(NAME, decode_attention)
    decode_attention_triton.custom_op()  # registered here, not in the compiled region that calls it
    _PREVIOUS[id(cfg)] = current
    cfg._attn_implementation = NAME
    return True

"""The running batch's KV cache and the decode step of :mod:`pipeline.serve.batching`, the seam where a decode
step can be swapped.

The batch keeps one padded cache: per layer, keys and values ``[batch, heads, past, dim]`` with each row's real
columns right-aligned (zeros left of them, hidden by a 2-D attention mask; each row's ``position_ids`` are its
own length), the layout of Hugging Face's batched ``generate`` with left padding (transformers 5.x
``LlamaModel`` builds the causal mask from the 2-D mask and ``cache_position``). A decode step appends one
column to it (``DynamicCache.update``, a ``torch.cat`` per layer, as ``model.generate`` does). When the batch's
membership changes, :func:`regroup` builds the next cache from the rows that stay (sliced, trimmed to the
longest) and the newcomers' prefill caches (padded in), once; between changes nothing is copied but the
appended column.

A decode step is any ``step(model, state: BatchState) -> logits [batch, vocab]`` that honours
:class:`BatchState`'s contract; :class:`DynamicCacheStep` (one eager forward) is the default, and
``Scheduler(..., step=...)`` / ``GenerationEngine(..., step=...)`` take another (e.g. a graph-captured
static-cache step on CUDA that declares ``owns_cache`` and takes each joining sequence's columns into its own
slots when ``state.regroups`` changes; see :class:`BatchState`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def pad_left(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack ``[1, heads, L_i, dim]`` tensors into ``[batch, heads, length, dim]``, each right-aligned (zeros left)."""
    first = tensors[0]
    out = first.new_zeros((len(tensors), first.shape[1], length, first.shape[3]))
    for b, t in enumerate(tensors):
        out[b, :, length - t.shape[2] :] = t[0]
    return out


def left_pad_mask(lengths: list[int], total: int) -> torch.Tensor:
    """Attention mask ``[batch, total]`` (1 = attend) for left-padded rows whose real lengths are ``lengths``."""
    pos = torch.arange(total)
    return (pos[None, :] >= (total - torch.tensor(lengths))[:, None]).long()


@dataclass
class BatchState:
    """The running batch as a decode step sees it. Row ``b`` is ``seqs[b]``; ``cache`` holds, for every layer,
    keys and values ``[batch, heads, past, dim]`` with row ``b``'s ``lengths[b]`` real columns right-aligned
    (zeros left of them). The scheduler sets ``input_ids`` ``[batch, 1]`` (each row's last token),
    ``position_ids`` ``[batch, 1]`` (= ``lengths``) and ``attention_mask`` ``[batch, past + 1]`` before each step;
    a step appends one column per layer to ``cache`` and returns the logits ``[batch, vocab]``.
    ``regroups`` numbers the scheduler's membership changes; ``joined`` lists the rows that joined at the last one.

    A step with ``owns_cache = True`` keeps the cache itself (e.g. static slots for CUDA graphs): at a regroup
    ``cache`` then holds only the ``joined`` rows (cache row ``j`` is ``seqs[joined[j]]``, right-aligned to the
    longest of them), to be taken into the step's own storage; rows that stay are the step's to keep (it drops
    sequences no longer in ``seqs``), and the scheduler never reads ``cache`` back. Such a step may define
    ``leave(seq)`` (the scheduler calls it when ``seq`` finishes or is cancelled, so its storage is free at once)
    and ``reset()`` (a failed step or shutdown dropped the whole batch), and ``uses_attention_mask = False`` (the
    scheduler then leaves ``attention_mask`` None); :class:`pipeline.serve.graph_step.GraphedStep` does all three."""

    seqs: list[Any]
    cache: Any
    lengths: list[int]
    past: int
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    regroups: int = 0
    joined: list[int] = field(default_factory=list)


def cache_kwarg(model: Any) -> str:
    """forward's cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns
    until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


DecodeStep = Callable[[Any, BatchState], torch.Tensor]


class DynamicCacheStep:
    """The default decode step: one eager forward over a transformers ``DynamicCache`` (its ``update``
    appends the new column). Any ``step(model, state) -> logits`` with the same contract can replace it
    (``Scheduler(..., step=...)``), e.g. a graph-captured static-cache step on CUDA."""

    def __init__(self, model: Any) -> None:
        self.cache_kw = cache_kwarg(model)

    def __call__(self, model: Any, state: BatchState) -> torch.Tensor:
        out = model(
            input_ids=state.input_ids,
            attention_mask=state.attention_mask,
            position_ids=state.position_ids,
            cache_position=torch.tensor([state.past], device=state.input_ids.device),
            use_cache=True,
            **{self.cache_kw: state.cache},
        )
        return out.logits[:, -1]


def regroup(
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None,
    past: int,
    keep: list[int],
    kept_lengths: list[int],
    joining: list[list[tuple[torch.Tensor, torch.Tensor]]],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """The padded per-layer cache of a batch whose membership changed: rows ``keep`` of ``layers``
    (``[B, heads, past, dim]``, right-aligned, real lengths ``kept_lengths``) then the ``joining`` sequences'
    own caches (``[1, heads, L, dim]`` per layer), all right-aligned to the longest. Returns (layers, past)."""
    new_past = max(kept_lengths + [c[0][0].shape[2] for c in joining])
    n_layers = len(layers) if layers is not None else len(joining[0])
    out = []
    for i in range(n_layers):
        kv = []
        for j in (0, 1):
            parts = []
            if keep:
                old = layers[i][j].index_select(0, torch.tensor(keep, device=layers[i][j].device))
                if new_past <= past:
                    old = old[:, :, past - new_past :]
                else:
                    old = torch.nn.functional.pad(old, (0, 0, new_past - past, 0))
                parts.append(old)
            if joining:
                parts.append(pad_left([c[i][j] for c in joining], new_past))
            kv.append(parts[0] if len(parts) == 1 else torch.cat(parts, 0))
        out.append((kv[0], kv[1]))
    return out, new_past

"""Batched prefill for the scheduler (:mod:`pipeline.serve.batching`): prompts that arrive together, run as one
left-padded forward instead of one forward each.

With 8 concurrent clients a round's requests arrive together, and each used to be prefilled alone: 8 forwards
before the round's first decode step. Here prompts of similar lengths share one forward over a ``DynamicCache``
(:func:`prefill_groups` says which; :func:`padded_prefill` runs it): a 2-D mask hides the pads and each row's
positions start at 0 at its first real token, as in the batched decode step, so a row computes what the prompt
alone would, up to float rounding (tests/test_static_decoder_families.py checks logits and cache columns for each
family the server serves). Each sequence then keeps its own columns of that cache (:func:`row_cache`, views
that the batch's regroup copies). Measured on the shipped tiny model (2-core CPU, bench/RESULTS.md): 8
concurrent clients 643-739 against 628-687 tok/s, first streamed token p50 58-72 against 69-93 ms.

Prompts asking for prompt log-probs (every position's logits) and models whose cache has sliding-window layers
(:func:`full_attention_cache`: such a layer keeps a window, not the padded columns a row is cut from) are
prefilled alone, as before.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence as Seq, TypeVar

import torch

from pipeline.serve.batch_cache import left_pad_mask

# Prefill prompts that arrive together in one forward; bench/serve_load.py's "--no-batch-prefill" turns it off to
# measure what it is worth.
BATCH_PREFILL = True
# Prompts prefilled in one forward: at most this many tokens with the pads, and pads at most a quarter of them
# (prompts of similar lengths; a long prompt among short ones is prefilled apart).
PREFILL_BATCH_TOKENS = 8192
PREFILL_MAX_PAD = 0.25

S = TypeVar("S")  # anything with a ``prompt`` (the scheduler's Sequence)


def prefill_groups(seqs: Seq[S], together: Callable[[S], bool]) -> list[list[S]]:
    """``seqs`` in prefill groups, in admission order within each: those ``together`` accepts, sorted by prompt
    length, in runs whose padded size stays within ``PREFILL_BATCH_TOKENS`` and whose pads within
    ``PREFILL_MAX_PAD`` of it; every other one alone. Groups come in the order of their first member."""
    joins = [together(s) for s in seqs]
    alone = [[s] for s, j in zip(seqs, joins) if not j]
    groups: list[list[S]] = []
    run: list[S] = []
    for s in sorted((s for s, j in zip(seqs, joins) if j), key=lambda s: len(s.prompt)):
        cand = run + [s]
        padded = len(cand) * len(s.prompt)  # the longest so far is this one
        pads = padded - sum(len(c.prompt) for c in cand)
        if run and (padded > PREFILL_BATCH_TOKENS or pads > PREFILL_MAX_PAD * padded):
            groups.append(run)
            cand = [s]
        run = cand
    if run:
        groups.append(run)
    order = {id(s): i for i, s in enumerate(seqs)}
    return sorted([sorted(g, key=lambda s: order[id(s)]) for g in groups] + alone, key=lambda g: order[id(g[0])])


def full_attention_cache(config: Any) -> bool:
    """Every layer of the model's ``DynamicCache`` keeps all its columns (no sliding-window layer); False where
    transformers cannot build that cache from the config (such a model's prompts are prefilled alone)."""
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001  (an unusual config: the one-prompt path, which builds its own cache, stays)
        return False
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def padded_prefill(model: Any, cache_kw: str, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
    """One forward over ``prompts``, left-padded: (its ``DynamicCache``, each row's last-position logits
    [n, vocab] in float32). ``cache_kw``: forward's cache argument (:func:`~pipeline.serve.batch_cache.cache_kwarg`)."""
    from transformers import DynamicCache

    device = model.device
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    positions = (torch.arange(width)[None, :] - (width - lengths)[:, None]).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids.to(device), attention_mask=left_pad_mask(lengths.tolist(), width).to(device),
                position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **{cache_kw: cache})  # fmt: skip
    return cache, out.logits[:, -1].float()


def row_cache(cache: Any, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s own ``length`` columns of a left-padded prefill cache, per layer ([1, heads, length, dim]
    views)."""
    pad = cache.layers[0].keys.shape[2] - length
    return [(layer.keys[row : row + 1, :, pad:], layer.values[row : row + 1, :, pad:]) for layer in cache.layers]

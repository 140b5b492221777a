"""The continuous-batching scheduler's decode step through :class:`~pipeline.serve.cuda_graphs.GraphedDecoder`:
a static KV cache of ``max_batch`` slots x ``max_len`` positions and, on CUDA, one CUDA graph per batch-size
bucket (optionally with per-layer ``torch.compile``), so the embedded server's decode does not wait on Python.

It plugs into :mod:`pipeline.serve.batching` through the step seam (:class:`~pipeline.serve.batch_cache.BatchState`)
as a step that ``owns_cache``: the scheduler still prefills each newcomer eagerly with its own ``DynamicCache``
(prompt log-probs, first token); at the next membership change the step receives only the joiners' columns
(``state.joined``), copies each into the slot of its row, and from then on the sequence lives in the slot.

Slots follow rows: row ``b`` of ``state.seqs`` is slot ``b`` (the decoder replays the graph over slots
``0 .. n-1``). When sequences leave, the rows that stay keep their order (the scheduler appends joiners after
them), so the step compacts them down into ``0 .. kept-1`` (:meth:`GraphedDecoder.compact`) and writes the
joiners into the slots after. A sequence that finishes or is cancelled is released at once
(:meth:`GraphedStep.leave`, called by the scheduler's ``_drop_finished``). Positions come from the scheduler
(``state.position_ids``), so its lengths, not the decoder's own counters, are the truth.

Length: the cache holds ``max_len`` positions, and a step writes the fed token at position ``lengths[b]``;
:class:`~pipeline.serve.generate.GenerationEngine` therefore lowers ``max_context`` to ``max_len`` for these
steps, so a request whose prompt + ``max_tokens`` passes it is refused with a 400 (``context_length_exceeded``)
before it queues, as with any other context cap. A row that nevertheless reaches ``max_len`` fails the step
with a :class:`~pipeline.errors.StageError` rather than writing out of bounds.

``GenerationEngine(decode=...)`` picks the step: ``"eager"`` (the default :class:`DynamicCacheStep`),
``"graphs"``, ``"graphs+compile"``; ``"auto"`` is ``"graphs+compile"`` on CUDA (eager elsewhere, and eager with a
warning where this step refuses the model or it does not compile). Checked for exact greedy equality on the CPU
(the static-cache path without capture, tests/test_graph_step.py) and, with capture and compile, against the
eager step on an H200 (the ``gpu`` tests there); measured through this scheduler on the H200 for the Llama-3-8B
shape (``bench/decode_speed.py --server``), batch 1 with the server's 4,096-position cache: bf16 19.4 -> 197.5
tok/s, INT4 15.5 -> 331.4 tok/s (q|k|v and gate|up merged, decode attention skipping the cache's empty blocks on
CUDA: :mod:`pipeline.serve.fused_proj`, :mod:`pipeline.serve.decode_attention_triton`). On the CPU, ``graphs``
runs the same static-cache step eagerly (no capture) and ``graphs+compile`` does not compile (inductor on the CPU
needs a C compiler and minutes per shape).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from pipeline.errors import RecipeError, StageError

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "eager", "graphs", "graphs+compile")


class GraphedStep:
    """A decode step over a :class:`GraphedDecoder` (module docstring). ``graphs=None``: capture on CUDA only."""

    owns_cache = True
    uses_attention_mask = False  # the decoder masks each slot by its position (keys <= pos)

    def __init__(self, model: Any, max_batch: int = 16, max_len: int = 2048, *, compile_layers: bool = False,
                 graphs: bool | None = None, buckets: list[int] | None = None, fuse: bool = True) -> None:  # fmt: skip
        from pipeline.serve.cuda_graphs import GraphedDecoder

        _check_family(model, max_len)
        self.dec = GraphedDecoder(model, max_batch=max_batch, max_len=max_len, buckets=buckets,
                                  compile_layers=compile_layers, graphs=graphs, fuse=fuse)  # fmt: skip
        self.max_len, self.max_batch = max_len, max_batch
        self.slots: dict[Any, int] = {}  # sequence -> its slot (rows of the last step)
        self.seen: int | None = None  # the BatchState.regroups last taken in
        self.took = 0  # joiners whose prefill columns were written into a slot

    @property
    def graphs_enabled(self) -> bool:
        return self.dec.graphs_enabled

    # -- the scheduler's hooks

    def leave(self, seq: Any) -> None:
        """``seq`` finished or was cancelled: its slot is free now (its rows are overwritten by a later joiner)."""
        slot = self.slots.pop(seq, None)
        if slot is not None:
            self.dec.release(slot)

    def reset(self) -> None:
        """Forget every sequence (the batch failed or the scheduler stopped)."""
        for slot in self.slots.values():
            self.dec.release(slot)
        self.slots.clear()

    def warmup(self) -> None:
        """Capture (and with compile, compile) the graph of every bucket now, so no request pays for it later.
        Only with no sequence in the slots (at start-up); leaves every slot free."""
        if self.slots:
            raise StageError("GraphedStep.warmup runs only while no sequence holds a slot (at server start-up).")
        if not self.dec.graphs_enabled:
            return
        for bucket in self.dec.buckets:
            self.dec.step(torch.zeros(bucket, dtype=torch.long))
        self.dec.pos.zero_()

    def __call__(self, model: Any, state: Any) -> torch.Tensor:
        n = len(state.seqs)
        if n > self.max_batch:
            raise StageError(f"The batch holds {n} sequences but the static cache has {self.max_batch} slots. "
                             "Start the server with max_batch_size at most the graphed step's max_batch.")  # fmt: skip
        if state.regroups != self.seen:
            self._take(state)
        longest = max(state.lengths)
        if longest >= self.max_len:
            raise StageError(
                f"A sequence reached {longest + 1} tokens but the static KV cache holds {self.max_len} positions. "
                "The engine caps max_context at the graphed step's max_len so this cannot happen through the "
                "server; raise max_len (GraphedStep(max_len=...)) for longer contexts."
            )
        self.dec.pos[:n].copy_(state.position_ids[:, 0])
        return self.dec.step(state.input_ids[:, 0])

    def launch_next(self, n: int, tokens: torch.Tensor) -> tuple[Callable[[], list[int]], torch.Tensor]:
        """The next step of the same ``n`` rows, fed by ``tokens`` [n] chosen on the device (positions advance in
        the graph): the function that gives those tokens, waiting for their copy to the host but not for the new
        step, and the new step's logits, valid until the step after it (``GraphedDecoder.step_from``); the
        scheduler advances the sequences meanwhile."""
        return self.dec.step_from(n, tokens)

    def greedy_tokens(self, n: int) -> torch.Tensor:
        """The argmax of the last call's ``n`` rows, computed inside the step (``GraphedDecoder.greedy_tokens``)."""
        return self.dec.greedy_tokens(n)

    # -- membership changes

    def _take(self, state: Any) -> None:
        """Compact the rows that stay into slots ``0 .. kept-1`` and write the joiners' columns after them."""
        self.seen = state.regroups
        joined = set(state.joined)
        stay = [s for b, s in enumerate(state.seqs) if b not in joined]
        if any(s not in self.slots for s in stay) or any(state.seqs[b] is not s for b, s in enumerate(stay)):
            raise StageError("GraphedStep lost track of a running sequence's slot (the scheduler must keep the rows "
                             "that stay first, in order, and append joiners after them).")  # fmt: skip
        src = [self.slots[s] for s in stay]
        for seq in [s for s in self.slots if not any(s is t for t in stay)]:
            self.leave(seq)
        self.dec.compact(src)
        self.slots = {s: b for b, s in enumerate(stay)}
        if state.joined:
            layers = state.cache.layers
            width = layers[0].keys.shape[2]
            for j, b in enumerate(state.joined):
                n = state.lengths[b]
                for i, layer in enumerate(layers):
                    self.dec.k[i][b, :, :n] = layer.keys[j, :, width - n:]
                    self.dec.v[i][b, :, :n] = layer.values[j, :, width - n:]
                self.slots[state.seqs[b]] = b
                self.took += 1
        state.cache = None  # the joiners' padded columns now live in the slots: free them


SAME_LOOP = ("llama", "mistral", "qwen2", "qwen3")  # families whose model forward is GraphedDecoder's layer loop


def _check_family(model: Any, max_len: int) -> None:
    """Refuse families whose forward does more than embed -> layers -> norm -> lm_head (e.g. Gemma scales its
    embeddings, Gemma 2/3 soft-cap logits): the static-cache loop would decode them silently wrong."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    why = None
    if family not in SAME_LOOP:
        why = f"its family {family!r} is not one whose forward the static-cache loop reproduces ({', '.join(SAME_LOOP)})"
    elif isinstance(window, int) and window < max_len:
        why = f"it attends through a sliding window of {window} tokens, and the static cache attends to all {max_len}"
    if why:
        raise StageError(
            f"The graphed decode step cannot serve {type(model).__name__}: {why}. Serve it with decode='eager' "
            "(serve.decode / --decode eager), or, for a sliding window, a decode max_len within the window."
        )


def make_step(decode: str, model: Any, max_batch: int, max_len: int, fuse: bool = True) -> GraphedStep | None:
    """The step for ``decode`` (:data:`DECODE_MODES`): None for the default eager step (``auto`` is resolved by
    ``GenerationEngine`` first). ``fuse``: q|k|v and gate|up as one product each (serve/fused_proj.py)."""
    if decode not in DECODE_MODES:
        raise RecipeError(
            f"Unknown decode mode {decode!r}. The embedded server decodes with one of {', '.join(DECODE_MODES)} "
            "('graphs': static KV cache + CUDA graphs on CUDA). Set serve.decode / --decode to one of those."
        )
    if decode in ("auto", "eager"):
        return None
    on_cuda = next(model.parameters()).device.type == "cuda"
    compile_layers = decode == "graphs+compile" and on_cuda
    if decode == "graphs+compile" and not on_cuda:
        log.warning("decode=graphs+compile on %s: the static-cache step runs without torch.compile (CUDA only)",
                    next(model.parameters()).device)  # fmt: skip
    return GraphedStep(model, max_batch, max_len, compile_layers=compile_layers, fuse=fuse)

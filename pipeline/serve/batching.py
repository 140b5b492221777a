"""Continuous batching for the embedded server: one scheduler thread owns the model.

Requests are :class:`Sequence` objects put on a queue. Each step of the scheduler loop (1) admits waiting
sequences while the batch has room (``max_batch_size`` sequences, ``max_batch_tokens`` reserved tokens, a
sequence reserving prompt + ``max_tokens``), (2) prefills the newcomers and samples their first tokens:
prompts of similar lengths that arrived together in one left-padded forward (:mod:`pipeline.serve.prefill`;
each keeps its own columns of that ``DynamicCache``), a prompt asking for prompt log-probs or a model with
sliding-window layers alone, (3) decodes every active sequence together: one forward of
``[batch, 1]`` tokens over the batch's left-padded cache (:mod:`pipeline.serve.batch_cache`), a 2-D attention
mask hiding the pads and per-row ``position_ids`` equal to each sequence's own length, so a row sees exactly the
keys and positions it would see alone. The batch's cache lives from step to step; it is rebuilt only when a
sequence joins or leaves (:func:`~pipeline.serve.batch_cache.regroup`), and goes when the batch empties.
Finished (EOS, stop string, ``max_tokens``) and cancelled sequences leave the batch at the next step. Until
this design the cache was rebuilt from per-sequence caches every step (O(batch x length) copies per step); one
sequence then decoded at 0.82-0.92x ``model.generate``'s tokens/s, and at ~1x since (``bench/serve_load.py``'s
single-sequence row; bench/RESULTS.md). The decode step itself is swappable (``step=``, the contract in
:class:`~pipeline.serve.batch_cache.BatchState`; a step may also define ``leave(seq)``, called when a sequence
leaves the batch, and ``reset()``, called when a failed step drops the whole batch), e.g. the static-cache CUDA
graph step of :mod:`pipeline.serve.graph_step`.

Queue caps: :meth:`Scheduler.capacity_error` says when more sequences may not wait (``max_queued`` beyond the
batch's free slots, ``max_queued_tokens`` reserved by waiting sequences); the app answers those with a 429.

Sampling per sequence uses its own ``torch.Generator`` seeded from the request's ``seed``
(:func:`pipeline.serve.generate.sample_next_token`), so a reply depends on the seed only, never on its batch.
Each step takes the batch's greedy tokens with one device sync, and a reply's text grows by decoding a short
window of ids per token (:mod:`pipeline.serve.detokenize`), not the whole reply again. With a step that can feed
itself (``launch_next``: the graphed step) and rows without log-probs, each row's token is chosen on the device
(the step's greedy one, or drawn with the request's generator) and the next step is launched from them before the
host reads them (:meth:`Scheduler._read_ahead`), so the host's work of a step overlaps the GPU's next one (H200,
Llama-3-8B shape, greedy, batch 1: INT4 494 against 416 tok/s, bf16 212 against 197; bench/RESULTS.md). A
sequence that ends on those tokens had one extra row computed, never shown. Results go to the
sequence's ``sink(event, payload)`` callback from the scheduler thread: ``("token", delta)``
with text safe to show (a possible stop-string prefix or an incomplete UTF-8 character is held back);
``("logprobs", [TokenLogprob])`` for the tokens chosen since the last one, just before the delta they made (and
before ``done`` for tokens that showed no text); ``("prompt_logprobs", [TokenLogprob])`` after the prefill with
``prompt_logprobs``; ``("done", FinishedSequence)``, or ``("error", exception)``. Sinks ignore events they do
not know.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.serve.batch_cache import (  # noqa: F401  (pad_left, left_pad_mask, regroup: re-exported)
    BatchState,
    DecodeStep,
    DynamicCacheStep,
    cache_kwarg,
    left_pad_mask,
    pad_left,
    regroup,
)
from pipeline.serve import prefill
from pipeline.serve.detokenize import IncrementalText, unsettled_tail

log = logging.getLogger(__name__)

# Launch the next decode step before reading this one's tokens, where the step can (Scheduler._read_ahead).
# bench/decode_speed.py's "-nooverlap" turns it off to measure what it is worth.
OVERLAP = True


# ------------------------------------------------------------------------------------- pure tensor functions


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable (token id, log-prob) of one row ``[vocab]``, most probable first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, k)
    return list(zip(ids.tolist(), values.tolist()))


def safe_text_end(text: str, stops: list[str], hold_space: bool = False) -> int:
    """How much of ``text`` can be shown before the reply ends: hold back a trailing incomplete character
    (U+FFFD from a partial UTF-8 sequence), any tail that could be the start of a stop string, and with
    ``hold_space`` (a tokenizer that cleans up tokenization spaces) a tail its clean-up may still change, from a
    trailing space (" ." becomes ".") to " '" ("'s"): :func:`~pipeline.serve.detokenize.unsettled_tail`."""
    end = len(text) - unsettled_tail(text, hold_space)
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):  # no slice of text: this runs every step on the whole reply
                end -= k
                break
    return end


# ------------------------------------------------------------------------------------- sequences


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the top k
    prompt_logprobs: bool = False  # echo: log-probs of the prompt tokens too


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class FinishedSequence:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None  # one per generated token
    prompt_logprobs: list[TokenLogprob] | None  # one per prompt token, the first with logprob None
    first_token_s: float | None  # seconds from submit to the first token


class Sequence:
    """One prompt being continued; the scheduler thread alone touches its cache and ids."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[str, Any], None]) -> None:
        self.prompt, self.params, self.sink = prompt, params, sink
        self.ids: list[int] = []
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cancelled = threading.Event()
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        self.shown = 0  # characters of the reply already sent as deltas
        self.lp_sent = 0  # log-probs already sent as events
        self.queued_in: Scheduler | None = None  # the scheduler whose queue counts it (until admitted or cancelled)
        self.generator: torch.Generator | None = None  # made on the logits' device at the first draw
        self.detok: IncrementalText | None = None  # the reply's text, grown a window at a time (scheduler's)

    def cancel(self) -> None:
        self.cancelled.set()
        if self.queued_in is not None:  # still waiting: its place in the queue is free at once
            self.queued_in._dequeued(self)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.ids)

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.params.max_tokens


def _generator(seq: Sequence, logits: torch.Tensor) -> torch.Generator:
    """``seq``'s sampling generator, on the device of ``logits`` (``torch.multinomial`` on CUDA takes a CUDA
    generator only), seeded from the request's ``seed`` at its first draw. The same seed gives the same reply on
    the same device whatever the batch; a CPU and a CUDA server draw different streams."""
    if seq.generator is None or seq.generator.device != logits.device:
        seq.generator = torch.Generator(device=logits.device)
        if seq.params.seed is None:
            seq.generator.seed()
        else:
            seq.generator.manual_seed(seq.params.seed & 0xFFFF_FFFF_FFFF_FFFF)
    return seq.generator


def _draw(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """``seq``'s next token drawn from its ``logits`` [vocab] with its own generator, on their device (a 0-d
    tensor: no host sync)."""
    from pipeline.serve.generate import sample_next_token

    p = seq.params
    return sample_next_token(logits[None].float(), p.temperature, p.top_p, _generator(seq, logits))[0]


# ------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """The thread that owns the model and runs the continuous batch (module docstring)."""

    def __init__(
        self,
        model: Any,
        decode: Callable[[list[int]], str],
        eos_token_ids: list[int],
        max_batch_size: int = 16,
        max_batch_tokens: int = 65536,
        hold_space: bool = False,
        *,
        max_queued: int | None = None,
        max_queued_tokens: int | None = None,
        step: DecodeStep | None = None,
    ) -> None:
        self.model, self.decode, self.eos = model, decode, set(eos_token_ids)
        self.hold_space = hold_space
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_queued, self.max_queued_tokens = max_queued, max_queued_tokens
        self.step: DecodeStep = step if step is not None else DynamicCacheStep(model)
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self.state: BatchState | None = None  # the running batch's padded cache (rows = state.seqs)
        self._held: Sequence | None = None  # a sequence taken from the queue that did not fit yet
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._queued, self._queued_tokens = 0, 0  # sequences / reserved tokens submitted, not yet admitted
        self._stop = threading.Event()
        self.steps, self.regroups = 0, 0  # decode steps; batch caches built (one per membership change)
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None  # a launched step's rows and logits
        # whose tokens are not read yet
        self.overlapped = 0  # steps launched before the tokens of the step before them were read (launch_next)
        self.prefill_batches = 0  # forwards that prefilled several prompts at once
        self._cache_kw = cache_kwarg(model)
        self._full_attention: bool | None = None  # every cache layer full attention (_prefill_together)

    # -- public

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def batch_size(self) -> int:
        return len(self.active)

    def capacity_error(self, n: int, tokens: int) -> str | None:
        """Why ``n`` more sequences reserving ``tokens`` in all may not queue now (the caps), or None.

        Sequences that can join the batch at the next step (free batch slots) do not count against
        ``max_queued``; a request arriving at an empty queue is never refused for its tokens alone."""
        queued, room = self._queued, max(0, self.max_batch_size - len(self.active))
        if self.max_queued is not None and queued + n > self.max_queued + room:
            return (f"{queued} sequences are already waiting for the batch (cap {self.max_queued} beyond its "
                    f"free slots); this request adds {n}")  # fmt: skip
        if self.max_queued_tokens is not None and queued and self._queued_tokens + tokens > self.max_queued_tokens:
            return (f"{self._queued_tokens} tokens are already reserved by waiting sequences (cap "
                    f"{self.max_queued_tokens}); this request reserves {tokens}")  # fmt: skip
        return None

    def submit(self, seq: Sequence) -> Sequence:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="quantship-scheduler", daemon=True)
                self._thread.start()
        with self._count_lock:
            seq.queued_in = self
            self._queued += 1
            self._queued_tokens += seq.reserved
        self.waiting.put(seq)
        return seq

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        self._stop.set()
        self.waiting.put(None)  # type: ignore[arg-type]  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            newcomers = self._admit()
            try:
                with torch.inference_mode():
                    self._prefill_all(newcomers)
                    self._drop_finished()
                    if self.active:
                        self._decode_step()
                        self._drop_finished()
            except Exception as e:  # a bug or a device failure: fail the batch, keep the server up
                log.exception("batch step failed; failing %d sequences", len(self.active))
                for seq in self.active:
                    seq.sink("error", e)
                    seq.cache = []
                self.active, self.state, self._ahead = [], None, None
                if hasattr(self.step, "reset"):  # a step that owns its cache forgets the failed batch
                    self.step.reset()
        stopping = RuntimeError("The server is shutting down; the request was not finished.")
        waiting = self.active + ([self._held] if self._held is not None else [])
        while not self.waiting.empty():
            waiting.append(self.waiting.get_nowait())
        for seq in waiting:
            if seq is not None and not seq.cancelled.is_set():
                seq.sink("error", stopping)
                seq.cancel()
        self.active, self._held, self.state, self._ahead = [], None, None, None
        if hasattr(self.step, "reset"):
            self.step.reset()

    def _dequeued(self, seq: Sequence) -> None:
        """``seq`` no longer counts against the queue caps (admitted, or cancelled while waiting); once only."""
        with self._count_lock:
            if seq.queued_in is self:
                seq.queued_in = None
                self._queued -= 1
                self._queued_tokens -= seq.reserved

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences that fit; block while nothing is active."""
        newcomers: list[Sequence] = []
        reserved = sum(s.reserved for s in self.active)
        while len(self.active) + len(newcomers) < self.max_batch_size:
            seq = self._held
            self._held = None
            if seq is None:
                try:
                    block = not self.active and not newcomers
                    seq = self.waiting.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
            if seq is None:  # shutdown wake-up
                break
            if seq.cancelled.is_set():
                self._dequeued(seq)
                continue
            if (self.active or newcomers) and reserved + seq.reserved > self.max_batch_tokens:
                self._held = seq
                break
            self._dequeued(seq)
            newcomers.append(seq)
            reserved += seq.reserved
        return newcomers

    def _prefill_all(self, newcomers: list[Sequence]) -> None:
        """Prefill the newcomers: prompts of similar lengths without prompt log-probs together, in one left-padded
        forward (:mod:`pipeline.serve.prefill`), the others alone; a group whose forward fails is prefilled again
        one by one, so a bad prompt fails alone while the running batch goes on."""
        groups = prefill.prefill_groups(newcomers, self._prefill_together)
        for group in groups:
            if len(group) > 1:
                try:
                    cache, logits = self._prefill_batch(group)
                except Exception:  # noqa: BLE001  (retried alone below: the failing prompt reports its error)
                    log.warning("batched prefill of %d prompts failed; prefilling them one by one", len(group),
                                exc_info=True)
                else:
                    for b, seq in enumerate(group):
                        self._guarded(seq, self._join_prefilled, seq, cache, b, logits[b])
                    continue
            for seq in group:
                self._guarded(seq, self._prefill, seq)

    def _guarded(self, seq: Sequence, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` for a newcomer; an error fails that sequence alone (the running batch goes on)."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("prefill failed")
            seq.sink("error", e)
            seq.cancel()

    def _prefill_together(self, seq: Sequence) -> bool:
        """``seq`` may share a padded prefill (:mod:`pipeline.serve.prefill`): no prompt log-probs, and a model
        whose cache layers are all full attention."""
        if seq.params.prompt_logprobs or not prefill.BATCH_PREFILL:
            return False
        if self._full_attention is None:
            self._full_attention = prefill.full_attention_cache(self.model.config)
        return self._full_attention

    def _prefill_batch(self, seqs: list[Sequence]) -> tuple[Any, torch.Tensor]:
        """One left-padded forward over the prompts of ``seqs``: (its cache, each row's last logits)."""
        out = prefill.padded_prefill(self.model, self._cache_kw, [s.prompt for s in seqs])
        self.prefill_batches += 1
        return out

    def _join_prefilled(self, seq: Sequence, cache: Any, row: int, logits: torch.Tensor) -> None:
        """``seq`` takes its own columns of a batched prefill's cache and its first token from ``logits``."""
        seq.cache = prefill.row_cache(cache, row, len(seq.prompt))
        self.active.append(seq)
        if seq.params.max_tokens > 0:
            self._advance(seq, logits)
        else:
            self._finish(seq, "length")

    def _prefill(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.model.device)
        cache = DynamicCache(config=self.model.config)
        keep = 0 if seq.params.prompt_logprobs else 1
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self._cache_kw: cache})
        logits = out.logits[0].float()
        if seq.params.prompt_logprobs:
            lp = torch.log_softmax(logits[:-1], dim=-1)
            k = seq.params.logprobs or 0
            seq.prompt_logprobs = [TokenLogprob(seq.prompt[0], None, [])] + [
                TokenLogprob(t, float(lp[i, t]), top_logprobs(lp[i], k)) for i, t in enumerate(seq.prompt[1:])
            ]
            seq.sink("prompt_logprobs", seq.prompt_logprobs)
        seq.cache = [(layer.keys, layer.values) for layer in cache.layers]
        self.active.append(seq)
        if seq.params.max_tokens > 0:
            self._advance(seq, logits[-1])
        else:
            self._finish(seq, "length")

    def _regroup(self) -> BatchState:
        """The batch state for ``self.active``: the same object while membership is unchanged, else the kept
        rows sliced out of the old padded cache and the newcomers' prefill caches padded in (:func:`regroup`)."""
        from transformers import DynamicCache

        state = self.state
        if state is not None and len(state.seqs) == len(self.active) and all(
            a is b for a, b in zip(state.seqs, self.active)
        ):
            return state
        rows = {id(s): b for b, s in enumerate(state.seqs)} if state is not None else {}
        kept = [s for s in self.active if id(s) in rows]
        joining = [s for s in self.active if id(s) not in rows]
        lengths = [state.lengths[rows[id(s)]] for s in kept] + [s.length - 1 for s in joining]
        # A step that owns its cache (owns_cache) keeps the rows that stay: the cache carries only the joiners.
        owns = bool(getattr(self.step, "owns_cache", False))
        keep = [] if owns else kept
        cache = None
        if keep or joining:
            old = [(layer.keys, layer.values) for layer in state.cache.layers] if keep else None
            layers, _ = regroup(old, state.past if state else 0, [rows[id(s)] for s in keep],
                                [state.lengths[rows[id(s)]] for s in keep], [s.cache for s in joining])  # fmt: skip
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        for s in joining:
            s.cache = []  # its columns now live in the batch's cache
        self.active = kept + joining
        self.regroups += 1
        joined = list(range(len(kept), len(self.active)))
        self.state = BatchState(self.active, cache, lengths, max(lengths), regroups=self.regroups, joined=joined)
        return self.state

    def _decode_step(self) -> None:
        if self._ahead is not None:
            return self._read_ahead()
        state = self._regroup()
        batch = state.seqs
        device = self.model.device
        state.input_ids = torch.tensor([[s.ids[-1]] for s in batch], dtype=torch.long, device=device)
        state.position_ids = torch.tensor([[n] for n in state.lengths], device=device)
        if getattr(self.step, "uses_attention_mask", True):  # a static-cache step masks by position itself
            state.attention_mask = left_pad_mask([n + 1 for n in state.lengths], state.past + 1).to(device)
        logits = self.step(self.model, state)
        self._count_step(state)
        if OVERLAP and getattr(self.step, "launch_next", None) is not None and all(s.logprobs is None for s in batch):
            self._ahead = (batch, logits)  # no log-probs to read on the host: tokens are read after the next launch
            return
        # Every row's greedy token with one device sync (argmax of bf16 logits = of their float32); a step that
        # computes them itself (the graphed step, inside its graph) saves the argmax kernel
        own = getattr(self.step, "greedy_tokens", None)
        greedy = (own(len(batch)) if own is not None else logits.argmax(dim=-1)).tolist()
        for b, seq in enumerate(batch):
            if not seq.cancelled.is_set():
                self._advance(seq, logits[b], greedy[b])

    def _count_step(self, state: BatchState) -> None:
        state.past += 1
        state.lengths = [n + 1 for n in state.lengths]
        self.steps += 1

    def _read_ahead(self) -> None:
        """Choose the tokens of the launched step (``self._ahead``: its rows and logits) on the device, read them
        and advance its sequences. While the batch is unchanged (no joiner, none finished or cancelled, room left
        in the cache) the next step is launched first, fed by those tokens on the device (``step.launch_next``),
        so the GPU runs it while the host advances the sequences (detokenizing, stop strings, streaming): the
        host's time between steps no longer leaves the GPU idle. A sequence that finishes on these tokens had its
        row of the next step computed for nothing; the step after that one is a plain one over the new batch."""
        (batch, logits), self._ahead = self._ahead, None
        state = self.state
        chain = (
            state is not None and len(self.active) == len(batch) and all(a is b for a, b in zip(self.active, batch))
            and not any(s.cancelled.is_set() for s in batch)
            and max(state.lengths) < getattr(self.step, "max_len", float("inf"))
        )  # fmt: skip
        chosen = self._choose(batch, logits)
        if chain:
            read, next_logits = self.step.launch_next(len(batch), chosen)
            self._count_step(state)
            self.overlapped += 1
            tokens = read()
            self._ahead = (batch, next_logits)
        else:
            tokens = chosen.tolist()
        for b, seq in enumerate(batch):
            if not seq.cancelled.is_set():
                self._advance(seq, None, chosen=tokens[b])

    def _choose(self, batch: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token, on the device: the step's greedy one, or drawn from ``logits`` with the
        sequence's own generator by :func:`_draw`, as :meth:`_advance` draws it (a seeded reply is the same
        either way)."""
        chosen = self.step.greedy_tokens(len(batch))
        sampled = [(b, s) for b, s in enumerate(batch) if s.params.temperature > 0 and not s.cancelled.is_set()]
        if sampled:
            chosen = chosen.clone()
            for b, seq in sampled:
                chosen[b] = _draw(seq, logits[b])
        return chosen

    def _advance(self, seq: Sequence, logits: torch.Tensor | None, greedy: int | None = None, *,
                 chosen: int | None = None) -> None:  # fmt: skip
        """Pick the next token from ``logits`` [vocab] (``greedy``: its argmax, when already known; ``chosen``:
        the token itself, already picked), report it, and finish the sequence when it ends."""
        from pipeline.serve.generate import first_stop

        p = seq.params
        if chosen is not None:
            token = chosen
        elif p.temperature <= 0:
            token = int(logits.argmax()) if greedy is None else greedy
        else:
            token = int(_draw(seq, logits))
        seq.ids.append(token)
        if seq.first_token_s is None:
            seq.first_token_s = time.perf_counter() - seq.submitted
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            seq.logprobs.append(TokenLogprob(token, float(lp[token]), top_logprobs(lp, p.logprobs or 0)))
        if token in self.eos:
            return self._finish(seq, "stop")
        if seq.detok is None:
            seq.detok = IncrementalText(self.decode, self.hold_space)
        settled = len(seq.detok.text)  # checked for stops already, but for a stop that ends past it
        text = seq.detok.update(seq.ids)
        if p.stops:
            since = max(0, settled - max(len(s) for s in p.stops) + 1)
            if first_stop(text[since:], p.stops) is not None:
                return self._finish(seq, "stop")
        if len(seq.ids) >= p.max_tokens:
            return self._finish(seq, "length")
        end = safe_text_end(text, p.stops, self.hold_space)
        if end > seq.shown:
            self._send_logprobs(seq)
            seq.sink("token", text[seq.shown : end])
            seq.shown = end

    def _finish(self, seq: Sequence, reason: str) -> None:
        from pipeline.serve.generate import first_stop

        ended_on_eos = bool(seq.ids) and seq.ids[-1] in self.eos
        text = self.decode(seq.ids[:-1] if ended_on_eos else seq.ids)
        cut = first_stop(text, seq.params.stops) if seq.params.stops else None
        if cut is not None:
            text = text[:cut]
        if len(text) > seq.shown:
            self._send_logprobs(seq)
            seq.sink("token", text[seq.shown :])
            seq.shown = len(text)
        self._send_logprobs(seq)  # the tokens no text was shown for (EOS, a stop string)
        seq.sink(
            "done",
            FinishedSequence(
                text, list(seq.ids), len(seq.prompt), reason, seq.logprobs, seq.prompt_logprobs, seq.first_token_s
            ),
        )
        seq.cancelled.set()  # leaves the batch at the next _drop_finished

    def _drop_finished(self) -> None:
        keep = []
        leave = getattr(self.step, "leave", None)  # a step that owns its cache frees the sequence's slot
        for s in self.active:
            if s.cancelled.is_set():
                s.cache = []  # freed now, not when the request object goes
                if leave is not None:
                    leave(s)
            else:
                keep.append(s)
        self.active = keep
        if not keep:
            self.state = None  # the batch's cache goes with its last sequence
            self._ahead = None  # a launched step of finished sequences only: nothing to read

    @staticmethod
    def _send_logprobs(seq: Sequence) -> None:
        """The log-probs of the tokens chosen since the last call, as one ``("logprobs", [...])`` event (sent
        before the text they produced, so a streamed chunk carries both)."""
        if seq.logprobs is not None and len(seq.logprobs) > seq.lp_sent:
            seq.sink("logprobs", seq.logprobs[seq.lp_sent :])
            seq.lp_sent = len(seq.logprobs)

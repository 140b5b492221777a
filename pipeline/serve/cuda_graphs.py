"""Static KV cache + CUDA graphs for the one-token decode step of a Hugging Face decoder (Llama, Qwen2, Mistral:
``model.model.{embed_tokens, rotary_emb, layers, norm}`` and ``model.lm_head``).

Eager decode of an 8B model at batch 1 waits on Python: ~50 small kernels a layer launched one by one. Here
the step for each batch-size bucket (1, 2, 4, 8, ... up to ``max_batch``) is captured once into a CUDA graph
over static buffers (token ids, per-slot positions, a KV cache of ``max_batch`` slots x ``max_len`` positions
per layer) and replayed; with ``compile_layers=True`` each decoder layer also goes through ``torch.compile``
(one compiled region shared by all layers, so the ~20 elementwise kernels of norms, rotary and SwiGLU fuse
into a few) before capture. Quantized linears must be graph-safe: ``Int4Linear`` (our one-token CUDA GEMV or
tinygemm; the Triton GEMV tunes during the warm-up, before capture), ``Int8Linear`` and ``Fp8Linear`` are.
Attention goes through :mod:`pipeline.serve.decode_attention` (installed here: grouped-query decode without
copying the cache per head), and for the families of :mod:`pipeline.serve.fused_proj` (Llama, Mistral, Qwen2,
Qwen3) each decode layer runs q|k|v and gate|up as one product each (+10% bf16, +13% INT4 at batch 1 on the
H200). Measured on an H200, Llama-3-8B shape, batch 1 (bench/RESULTS.md): bf16 36 tok/s eager, 136 graphs,
179-183 graphs+compile (63-66% of the bandwidth bound); INT4 330 tok/s graphs+compile.

The cache is ours, not transformers' ``StaticCache``: its API moved between the transformers of this repo
(5.24: ``cumulative_length``, no ``cache_position``) and of the GPU machine (5.17), and a single shared write
position cannot hold sequences of different lengths. Each layer gets a ``_LayerKV`` that the attention module
calls as ``cache.update(k, v, layer_idx, ...)`` (the one method transformers' Llama attention uses); slot ``b``
holds its sequence at positions ``0 .. pos[b]``, and the 4D boolean mask ``key <= pos[b]`` (passed as
``attention_mask``, which transformers' ``create_causal_mask`` returns as is) hides the rest. We run the
model's layer loop ourselves (embed, rotary, layers, norm, lm_head: the body of ``LlamaModel.forward``).

Integration seam for the server's continuous-batching scheduler (serve/batching.py; wired by
:class:`pipeline.serve.graph_step.GraphedStep`, which takes the scheduler's eager prefill columns into the slots
instead of calling ``prefill``, and uses ``compact`` for the moves):

- a new request: ``slot = free slot``; ``logits = dec.prefill(slot, prompt_ids)`` (eager, batch 1, writes the
  slot's cache rows ``0 .. len-1``);
- every step: keep the running sequences in slots ``0 .. n-1`` (``dec.move_slot(src, dst)`` compacts after a
  sequence leaves), then ``logits = dec.step(next_tokens[:n])`` replays the graph of the smallest bucket >= n;
  or ``read, logits = dec.step_from(n, tokens)`` replays it fed by tokens chosen on the device, and ``read()``
  gives those tokens once they reach the host, without waiting for the new step;
- a finished or disconnected sequence: ``dec.release(slot)``; the scheduler must cap a sequence at
  ``max_len`` positions (``dec.max_len``).

The step also computes each row's greedy token inside the graph (:func:`greedy_ids`, read through
``greedy_tokens``: the scheduler's one device sync then needs no argmax kernel of its own, which took 29 us a
step on the H200), and with ``compile_layers`` its embedding and rotary, and its final add, norm and lm_head, run
as compiled regions too (about ten small kernels each became one or two).

The rows ``n .. bucket-1`` of a replay compute throwaway tokens (their positions advance, clamped; a later
``prefill`` resets them), so only slots ``0 .. n-1`` may hold live sequences. Sampling stays the scheduler's
(``step`` returns logits). First use of a bucket captures its graph: with ``compile_layers=True`` that took
~5-12 s on the H200 (a compile per bucket), so a server should call ``step`` once per bucket at start-up.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import StageError


class _LayerKV:
    """One layer's slice of the static cache; ``rows``/``pos`` say where ``update`` writes."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, start: int | None):
        self.k, self.v, self.rows, self.pos, self.start = k, v, rows, pos, start

    def update(self, key_states, value_states, *args, **kwargs):
        if self.start is None:  # decode: one token per row, row b at pos[b]
            self.k[self.rows, :, self.pos] = key_states[:, :, 0]
            self.v[self.rows, :, self.pos] = value_states[:, :, 0]
            n = key_states.shape[0]
            return self.k[:n], self.v[:n]
        slot, t = int(self.rows), key_states.shape[2]  # prefill of one slot
        self.k[slot, :, self.start:self.start + t] = key_states[0]
        self.v[slot, :, self.start:self.start + t] = value_states[0]
        return self.k[slot:slot + 1], self.v[slot:slot + 1]

    def get_seq_length(self, *args) -> int:
        return 0


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [n, vocab] in two stages: the maximum of each of ~sqrt(vocab) columns' stretches,
    then of those. The same ids (the first maximal one; NaN counts as maximal, as in argmax), but PyTorch's argmax
    reduces a row of a 128k vocabulary in one block (29 us on the H200) where this takes a few."""
    n, vocab = logits.shape
    width = _stretch(vocab)
    if width is None:  # no divisor near sqrt(vocab): pad with -inf (never the maximum unless all are)
        width = 1 << max(6, (vocab.bit_length() + 1) // 2)
        logits = torch.nn.functional.pad(logits, (0, -vocab % width), value=float("-inf"))
    best, where = logits.reshape(n, -1, width).max(dim=-1)  # [n, stretches]
    stretch = best.argmax(dim=-1, keepdim=True)
    return (stretch * width + where.gather(-1, stretch)).reshape(n)


@functools.cache
def _stretch(vocab: int) -> int | None:
    """A divisor of ``vocab`` between sqrt(vocab) / 4 and 4 sqrt(vocab) (the one nearest sqrt), or None."""
    root = int(vocab**0.5)
    for d in sorted(range(max(1, root // 4), 4 * root + 1), key=lambda d: abs(d - root)):
        if vocab % d == 0 and d >= 16:
            return d
    return None


def _run_layer(layer, h, mask, cos, sin, position_ids, kv, kv_name):
    kw = {kv_name: kv}
    out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids, use_cache=True,
                **kw)
    return out[0] if isinstance(out, tuple) else out


def _cache_kwarg(layer) -> str:
    """transformers 5.24 renamed the decoder layer's ``past_key_values`` to ``cache`` (the old name is warned)."""
    return "cache" if "cache" in inspect.signature(type(layer).forward).parameters else "past_key_values"


class GraphedDecoder:
    """Decode steps of ``model`` over a static cache of ``max_batch`` slots x ``max_len`` positions; CUDA graphs
    per bucket when the model is on CUDA (``graphs=None``: on CUDA), else the same step eagerly."""

    def __init__(self, model: nn.Module, max_batch: int = 8, max_len: int = 2048, buckets=None,
                 compile_layers: bool = False, graphs: bool | None = None, fuse: bool = True):
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise StageError(
                f"GraphedDecoder needs a Llama-style decoder (model.model.embed_tokens/layers/norm/rotary_emb), got "
                f"{type(model).__name__}. Serve this model without CUDA graphs (the plain generate path)."
            )
        self.model, self.inner = model, inner
        from pipeline.serve import decode_attention

        decode_attention.install(model)  # grouped-query decode without repeat_kv's copy of the cache
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.dtype == torch.float32 or not self.dtype.is_floating_point:
            self.dtype = next((b.dtype for b in model.buffers() if b.dtype.is_floating_point), torch.float32)
        self.max_batch, self.max_len = max_batch, max_len
        self.buckets = sorted(set(buckets or [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]))
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        act_dtype = inner.embed_tokens.weight.dtype
        shape = (max_batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=act_dtype) for _ in inner.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=act_dtype) for _ in inner.layers]
        self.pos = torch.zeros(max_batch, device=self.device, dtype=torch.long)  # next write position per slot
        self.tokens = torch.zeros(max_batch, 1, device=self.device, dtype=torch.long)
        self.greedy = torch.zeros(max_batch, device=self.device, dtype=torch.long)  # argmax of the last step's rows
        self._host_tokens: torch.Tensor | None = None  # step_from's pinned copy of its input tokens (CUDA)
        self.rows = torch.arange(max_batch, device=self.device)
        self.keys = torch.arange(max_len, device=self.device)
        self.graphs_enabled = self.device.type == "cuda" if graphs is None else graphs
        from pipeline.serve import fused_proj

        # decode: q|k|v and gate|up as one product each where the family's layer is fused_proj.decode_layer
        self.fused = fused_proj.fuse_layers(model) if fuse else None
        self._layer = _run_layer if self.fused is None else fused_proj.decode_layer
        if compile_layers:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._layer = torch.compile(self._layer, dynamic=False)
        self._greedy = torch.compile(greedy_ids, dynamic=False) if compile_layers else greedy_ids
        # the step's first and last work (embedding and rotary; the last add, norm and lm_head) as compiled regions
        # too: ~10 small kernels each become one or two (prefill keeps the eager ones: a shape per prompt length)
        self._embed_step, self._logits_step = self._embed, self._logits
        if compile_layers:
            self._embed_step = torch.compile(self._embed, dynamic=False)
            self._logits_step = torch.compile(self._logits, dynamic=False)
        self._kv_name = _cache_kwarg(inner.layers[0])
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # -- the forward over our cache -----------------------------------------------------------------------------
    def _embed(self, ids, position_ids):
        h = self.inner.embed_tokens(ids)
        return (h, *self.inner.rotary_emb(h, position_ids=position_ids))

    def _logits(self, h, pending):
        if pending is not None:
            h = h + pending
        return self.model.lm_head(self.inner.norm(h[:, -1]))

    def _forward(self, ids, position_ids, mask, rows, start):
        decode = start is None
        h, cos, sin = (self._embed_step if decode else self._embed)(ids, position_ids)
        pending = None  # fused_proj.decode_layer leaves its last residual add to the next layer
        for i, layer in enumerate(self.inner.layers):
            kv = _LayerKV(self.k[i], self.v[i], rows, self.pos[:ids.shape[0]] if start is None else None, start)
            if start is not None:  # prefill: the model's own layer, eager (a compile per prompt length otherwise)
                h = _run_layer(layer, h, mask, cos, sin, position_ids, kv, self._kv_name)
            elif self.fused is not None:
                h, pending = self._layer(layer, self.fused[i], h, pending, mask, cos, sin, kv)
            else:
                h = self._layer(layer, h, mask, cos, sin, position_ids, kv, self._kv_name)
        return (self._logits_step if decode else self._logits)(h, pending)

    def _decode(self, n: int) -> torch.Tensor:
        pos = self.pos[:n]
        mask = (self.keys[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, L]
        logits = self._forward(self.tokens[:n], pos[:, None], mask, self.rows[:n], None)
        self.greedy[:n] = self._greedy(logits)  # in the graph: the scheduler reads greedy tokens without an argmax
        pos.add_(1).clamp_(max=self.max_len - 1)
        return logits

    # -- the scheduler's API ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` [T] (one sequence) into ``slot``'s cache; the last position's logits [vocab]."""
        ids = input_ids.reshape(1, -1).to(self.device)
        t = ids.shape[1]
        if not 0 <= slot < self.max_batch or t == 0 or t >= self.max_len:
            raise StageError(f"prefill needs a slot in [0, {self.max_batch}) and 1..{self.max_len - 1} tokens, got "
                             f"slot {slot} and {t} tokens. Cap prompts at the decoder's max_len.")
        q = torch.arange(t, device=self.device)
        mask = (self.keys[None, :] <= q[:, None])[None, None]  # [1, 1, T, L]
        logits = self._forward(ids, q[None], mask, torch.tensor(slot), 0)
        self.pos[slot] = t
        return logits[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of slots ``0 .. n-1`` -> their next-token logits [n, vocab]; positions advance."""
        n = tokens.numel()
        bucket = self._bucket(n)
        self.tokens[:n, 0] = tokens.reshape(-1).to(self.device)
        return self._run(n, bucket)[:n].clone()

    @torch.inference_mode()
    def step_from(self, n: int, tokens: torch.Tensor) -> tuple[Callable[[], list[int]], torch.Tensor]:
        """The next step of slots ``0 .. n-1`` fed by ``tokens`` [n] on the device (no host round trip): a function
        that returns those tokens as ints, and the step's logits [n, vocab] (with graphs, a view of the graph's
        output: valid until the next step). On CUDA the tokens' copy to (pinned) host memory is queued before the
        new step, so the function waits for the copy alone while the new step runs; call it before the next
        ``step_from`` (one host buffer)."""
        bucket = self._bucket(n)
        src = tokens.reshape(-1)
        done = None
        if self.device.type == "cuda":
            if self._host_tokens is None:
                self._host_tokens = torch.empty(self.max_batch, dtype=torch.long, pin_memory=True)
            host = self._host_tokens[:n]
            host.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = src.clone()
        self.tokens[:n, 0] = src
        logits = self._run(n, bucket)[:n]

        def read() -> list[int]:
            if done is not None:
                done.synchronize()
            return host.tolist()

        return read, logits

    def _bucket(self, n: int) -> int:
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or n == 0:
            raise StageError(f"step takes 1..{self.max_batch} tokens, got {n}. Raise max_batch or split the batch.")
        return bucket

    def _run(self, n: int, bucket: int) -> torch.Tensor:
        """The step over ``self.tokens[:n]``: the bucket's graph replayed (captured at first use), or eager."""
        if not self.graphs_enabled:
            return self._decode(n)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out

    def greedy_tokens(self, n: int) -> torch.Tensor:
        """The argmax of the last ``step``'s rows ``0 .. n-1`` (computed inside the step: no argmax kernel of its
        own, so a greedy scheduler's one device sync reads them directly)."""
        return self.greedy[:n]

    def release(self, slot: int) -> None:
        self.pos[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s cache and position to ``dst`` (compaction after a sequence leaves)."""
        for k, v in zip(self.k, self.v):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])
        self.pos[dst] = self.pos[src]

    def compact(self, src: list[int]) -> None:
        """Move slot ``src[b]`` to slot ``b`` for every ``b`` (the rows that stay after others left). In order
        (``src`` increasing, as the scheduler keeps them) one ``move_slot`` per moved slot; else one gather."""
        if all(s == b for b, s in enumerate(src)):
            return
        if all(a < b for a, b in zip(src, src[1:])):
            for b, s in enumerate(src):
                if s != b:
                    self.move_slot(s, b)
            return
        idx = torch.tensor(src, device=self.device)
        for k, v in zip(self.k, self.v):
            k[: len(src)] = k[idx]
            v[: len(src)] = v[idx]
        self.pos[: len(src)] = self.pos[idx]

    def _capture(self, bucket: int) -> None:
        saved = self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: compiles, tunes the int4 kernels, creates cuBLAS handles
                self._decode(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._decode(bucket)
        self.pos.copy_(saved)  # the warm-up and capture advanced the positions; the replays own them from here
        self._graphs[bucket] = (graph, out)

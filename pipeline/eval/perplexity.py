"""Perplexity by the standard rolling-window protocol: one token stream, windows of ``seq_len`` new tokens.

The protocol, exactly:

1. **Tokens.** The evaluation text (documents joined with ``"\\n\\n"``; a file's text already is) is tokenized
   once, without the tokenizer's special tokens, and one *prefix token* is put in front of the stream: the
   tokenizer's BOS, or its EOS when it has no BOS. Nothing is added per window. For a Llama-style tokenizer
   this is the same stream as ``tokenizer(text)`` (BOS + text).
2. **Windows.** Every token of the stream after the prefix is predicted exactly once (``N - 1`` predictions
   for ``N`` stream tokens). Window ``k`` feeds ``ids[k*L : k*L + L]`` and scores its ``L`` next tokens
   ``ids[k*L + 1 : k*L + L + 1]`` (the "+1 label shift": consecutive windows share one token, the last
   target of one window is the first input of the next). The last window, when fewer than ``L`` targets
   are left, is moved left to end at the stream's end, so it still has ``L`` tokens of input, and only its
   new targets are scored (it is short only when the whole stream is). ``ceil((N - 1) / L)`` windows.
3. **Score.** ``log_softmax`` in float32 over the full vocabulary at each scored position; perplexity is
   ``exp(sum of NLL / number of predicted tokens)``, the sum accumulated in float64.

How this relates to the tools people compare against:

- **lm-eval** (``lm_eval/models/huggingface.py`` ``HFLM.loglikelihood_rolling`` with
  ``lm_eval/utils.py`` ``get_rolling_token_windows(token_list, prefix_token=prefix_token_id,
  max_seq_len=max_length, context_len=1)`` + ``make_disjoint_window``): its first window is
  ``[prefix] + t[:L-1]`` predicting ``t[:L]``, each further window predicts the next ``L`` tokens from the
  ``L`` tokens before them, and its last window is a full ``L``-token context scoring only the new tokens.
  Treating our whole text as one lm-eval document with ``max_length = seq_len``, those are the same inputs
  and the same scored positions as ours (checked window by window against lm-eval 0.4.13's functions), so
  ``nll_sum`` is the negated ``loglikelihood_rolling`` value, provided lm-eval encodes the document
  without the tokenizer's special tokens: lm-eval < 0.4.9.2 always did (``add_special_tokens=False`` for
  causal LMs); from 0.4.9.2 (commit 5302f2a, "Fix duplicate BOS issue") ``tok_encode`` uses the tokenizer's
  default, so a BOS-adding tokenizer puts a second BOS after the prefix BOS, which is scored and shifts
  every window by one token; pass ``--model_args add_bos_token=False`` there to get our stream. Other
  differences: (a) lm-eval's wikitext-style tasks score each *document* separately (one prefix per
  document, no cross-document context) and print ``word_perplexity = exp(nll_sum / words)`` and
  ``bits_per_byte``, not token perplexity; ``exp(nll_sum / n_words)`` recovers the former. (b) lm-eval
  takes ``log_softmax`` in the model's dtype unless ``softmax_dtype`` is set; we always use float32.
- **llama.cpp** ``llama-perplexity`` (``tools/perplexity/perplexity.cpp``, ``perplexity()``): by default
  it cuts the stream into non-overlapping chunks of ``n_ctx`` tokens, drops the trailing partial chunk,
  overwrites each chunk's first token with BOS (when the vocabulary adds one), and scores only the
  *second half* of each chunk (positions ``n_ctx/2 .. n_ctx-2`` predicting tokens ``n_ctx/2+1 ..
  n_ctx-1``: ``n_ctx/2 - 1`` tokens per chunk), so every scored token has at least ``n_ctx/2`` tokens
  of context. Its number is therefore lower than ours at the same ``n_ctx`` and is not the same
  quantity; it skips half the text. Its strided mode
  (``perplexity_v2``, ``--ppl-stride S`` with ``-c S+1``) feeds chunks of ``S+1`` tokens starting every
  ``S`` tokens and scores positions ``0 .. S-1`` of each, i.e. the same inputs and targets as our full
  windows with ``seq_len = S`` (its BOS overwrite there happens after ``llama_decode``, so it does not
  change the logits), except that it drops the trailing partial window, which we score.
- The Hugging Face perplexity guide with ``stride == max_length`` scores ``L - 1`` tokens per window (the
  first token of each window is never predicted); ours predicts every token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import CalibrationError, StageError

log = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n"

Progress = Callable[[int, int], None]  # progress(windows_done, windows_total)


def join_documents(documents: Iterable[str]) -> str:
    """The evaluation text of several documents: joined with a blank line, as the protocol reads them."""
    return DOCUMENT_SEPARATOR.join(documents)


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token the stream starts with: BOS, else EOS (lm-eval's ``HFLM.prefix_token_id`` rule), else None."""
    for name in ("bos_token_id", "eos_token_id"):
        tok = getattr(tokenizer, name, None)
        if tok is not None:
            return int(tok)
    return None


def tokenize_documents(tokenizer: Any, text: str) -> torch.LongTensor:
    """One int64 token stream of ``text`` by a ``transformers`` tokenizer: a prefix token, then the text.

    The prefix is BOS, else EOS (lm-eval's rule), so that the first text token is predicted too. The
    tokenizer's own special tokens are not added (``add_special_tokens=False``), so a tokenizer that
    appends EOS does not end the stream with one, and no BOS is ever added per window.
    """
    # verbose=False: the stream is meant to be longer than the model's context; windows cut it, so
    # transformers' "sequence length is longer than the maximum" warning does not apply.
    ids = list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    prefix = prefix_token_id(tokenizer)
    if prefix is None:
        log.warning("the tokenizer has neither a BOS nor an EOS token: the first text token is not predicted")
    else:
        ids.insert(0, prefix)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Window:
    """One forward pass: input ``ids[start:end]``, targets ``ids[start+1:end+1]``, scored from ``first_scored``."""

    start: int
    end: int
    first_scored: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def n_scored(self) -> int:
        return self.length - self.first_scored


def window_spans(n_tokens: int, seq_len: int) -> list[Window]:
    """The windows of the protocol for a stream of ``n_tokens`` (see the module docstring, step 2)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    n_pred = n_tokens - 1  # every token but the first (the prefix) is predicted once
    windows = []
    for k in range(max(0, math.ceil(n_pred / seq_len))):
        first_target = k * seq_len + 1
        last_target = min(k * seq_len + seq_len, n_pred)  # inclusive
        n_new = last_target - first_target + 1
        if n_new == seq_len or k == 0:
            windows.append(Window(k * seq_len, k * seq_len + n_new, 0))
        else:  # lm-eval's last rolling window: a full seq_len of context, only the new targets scored
            windows.append(Window(last_target - seq_len, last_target, seq_len - n_new))
    return windows


def _check_stream(ids: torch.Tensor, seq_len: int, batch_size: int) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()  # windows are cut on the CPU, sent per batch
    if ids.numel() < 2:
        raise CalibrationError(
            f"The evaluation text tokenizes to {ids.numel()} token(s), too few to predict any: perplexity needs "
            "at least 2 (the prefix token and one text token). Point eval.text at a longer held-out text."
        )
    return ids


def model_device(model: Any) -> torch.device:
    """Where ``model``'s inputs go: its ``device`` attribute, else its first parameter's device, else CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def model_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, time, vocab] of a causal LM called on ``input_ids`` [batch, time].

    ``model`` is a ``transformers`` causal LM (called with ``use_cache=False``: no KV cache is kept), or any
    callable returning the logits tensor or an object with ``.logits``.
    """
    if hasattr(model, "config"):  # a transformers model: skip building a KV cache we would throw away
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise StageError(
            f"The model returned logits of shape {shape} for input of shape {tuple(input_ids.shape)}; evaluation "
            "needs [batch, time, vocab] from a causal language model. Check that the evaluated folder holds a "
            "causal LM (AutoModelForCausalLM) and that its engine returns one logit row per input token."
        )
    return logits


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while evaluating; the caller's train/eval mode is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)


def iter_window_logprobs(
    model: Any,
    ids: torch.Tensor,
    windows: list[Window],
    batch_size: int = 4,
    progress: Progress | None = None,
) -> Iterator[tuple[Window, torch.Tensor, torch.Tensor]]:
    """For each window in order: (window, float32 log-probs [n_scored, vocab], targets [n_scored]).

    ``batch_size`` windows go through the model at once (all windows of one stream have the same length,
    except a lone short one, so no padding is ever needed); only one batch's logits exist at a time, and
    float32 log-probs are made for one window at a time.
    """
    device = model_device(model)
    total = len(windows)
    for b in range(0, total, batch_size):
        batch = windows[b : b + batch_size]
        inputs = torch.stack([ids[w.start : w.end] for w in batch]).to(device)
        # Eval mode and inference mode only around the forward: this is a generator, and two of them
        # (reference and candidate) are interleaved, so no state may stay changed across a yield.
        with _eval_mode(model), torch.inference_mode():
            logits = model_logits(model, inputs)
        for i, w in enumerate(batch):
            targets = ids[w.start + 1 + w.first_scored : w.end + 1].to(logits.device)
            if int(targets.max()) >= logits.shape[-1]:
                raise StageError(
                    f"Token id {int(targets.max())} is outside the model's vocabulary of {logits.shape[-1]} "
                    "logits: the evaluation text was tokenized with a different tokenizer than this model's. "
                    "Evaluate with the tokenizer saved in the model folder."
                )
            with torch.inference_mode():
                logprobs = torch.log_softmax(logits[i, w.first_scored :], dim=-1, dtype=torch.float32)
            yield w, logprobs, targets
        del logits
        if progress is not None:
            progress(min(b + batch_size, total), total)


def safe_exp(x: float) -> float:
    """``exp(x)``, or inf where it overflows (a broken model's NLL must give a figure, not a crash)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(
    model: Any,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the token stream ``ids`` by the rolling-window protocol (module docstring).

    Returns ``{"ppl", "nll_mean", "nll_sum", "tokens", "windows", "seq_len"}``: ``tokens`` is the number of
    predicted tokens (``len(ids) - 1``), ``nll_mean`` the mean negative log-likelihood per predicted token
    in nats, ``ppl = exp(nll_mean)``.
    """
    ids = _check_stream(ids, seq_len, batch_size)
    windows = window_spans(ids.numel(), seq_len)
    nll_sum = 0.0
    tokens = 0
    for _w, logprobs, targets in iter_window_logprobs(model, ids, windows, batch_size, progress):
        nll_sum -= float(logprobs.gather(-1, targets[:, None]).double().sum())
        tokens += targets.numel()
    nll_mean = nll_sum / tokens
    log.info("perplexity %.4f over %d tokens in %d windows of %d", safe_exp(nll_mean), tokens, len(windows), seq_len)
    return {
        "ppl": safe_exp(nll_mean),
        "nll_mean": nll_mean,
        "nll_sum": nll_sum,
        "tokens": tokens,
        "windows": len(windows),
        "seq_len": seq_len,
    }

"""Drift from the reference model on the same tokens: KL divergence, top-1 agreement, perplexities.

Every figure is taken over the positions the perplexity protocol scores (``perplexity.window_spans``), so
the candidate's perplexity here is exactly ``perplexity(model, ...)``. Per scored position ``i``:

    KL_i = sum_v P_ref(v | ctx_i) * (log P_ref(v | ctx_i) - log P_model(v | ctx_i))     (nats)

from float32 ``log_softmax`` of both models' logits; ``kl_mean`` is its mean over all predicted tokens
(llama.cpp's ``--kl-divergence`` "Mean KLD" is the same quantity; it reads the base log-probs back from a
uint16-quantized file, we keep float32). ``top1_agreement`` is the fraction of positions where both
models' most likely next token is the same (llama.cpp's "Same top p").

Two ways to run it:

- ``compare_to_reference(ref_model, model, ids, seq_len)``: one pass, both models on each batch.
- ``ReferenceLogprobs.compute(ref_model, ids, seq_len, folder=...)`` once, then
  ``compare_to_reference_logprobs(reference, model)`` per candidate: the reference is never run again.
  The log-probs are stored window by window (memory, or a folder of safetensors files that any later
  process can ``ReferenceLogprobs.load``); they take ``tokens * vocab * 4`` bytes in float32 (2 in float16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import StageError
from pipeline.eval.perplexity import (
    Progress,
    Window,
    _check_stream,
    iter_window_logprobs,
    safe_exp,
    window_spans,
)

log = logging.getLogger(__name__)

REFERENCE_META = "reference.json"
REFERENCE_IDS = "ids.safetensors"
REFERENCE_WINDOW = "window-{:06d}.safetensors"
REFERENCE_VERSION = 1


def token_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) in nats at each position: [n, vocab] log-probs of both -> [n]."""
    ref_logprobs = ref_logprobs.float()
    p_ref = ref_logprobs.exp()
    terms = p_ref * (ref_logprobs - logprobs.float())
    # 0 * log(0 / q) = 0: where P_ref is 0 the term vanishes even if log P_ref is -inf (masked vocabulary).
    terms = torch.where(p_ref > 0, terms, torch.zeros_like(terms))
    # KL >= 0 (Gibbs); float32 rounding can leave about -1e-9 for two nearly equal rows.
    return terms.sum(-1).clamp(min=0)


class _Divergence:
    """Running sums over scored positions; ``result`` turns them into the metrics dict."""

    def __init__(self) -> None:
        self.nll_sum = 0.0
        self.ref_nll_sum = 0.0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.top1_same = 0
        self.tokens = 0
        self.windows = 0

    def add(self, ref_logprobs: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        if ref_logprobs.shape != logprobs.shape:
            raise StageError(
                f"The reference gives {ref_logprobs.shape[-1]} logits per token and the evaluated model "
                f"{logprobs.shape[-1]}: the two do not share a vocabulary, so KL divergence and top-1 "
                "agreement are undefined. Evaluate a model quantized from this reference, with its tokenizer."
            )
        ref_logprobs = ref_logprobs.to(logprobs.device, torch.float32)
        kl = token_kl(ref_logprobs, logprobs)
        self.kl_sum += float(kl.double().sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.top1_same += int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
        self.nll_sum -= float(logprobs.gather(-1, targets[:, None]).double().sum())
        self.ref_nll_sum -= float(ref_logprobs.gather(-1, targets[:, None]).double().sum())
        self.tokens += targets.numel()
        self.windows += 1

    def result(self, seq_len: int, ref_nll_sum: float | None = None) -> dict[str, Any]:
        n = self.tokens
        ref_nll_mean = (self.ref_nll_sum if ref_nll_sum is None else ref_nll_sum) / n
        ppl, ref_ppl = safe_exp(self.nll_sum / n), safe_exp(ref_nll_mean)
        return {
            "ppl": ppl,
            "nll_mean": self.nll_sum / n,
            "nll_sum": self.nll_sum,
            "ref_ppl": ref_ppl,
            "ref_nll_mean": ref_nll_mean,
            "ppl_increase_pct": 100.0 * (ppl / ref_ppl - 1.0),
            "kl_mean": self.kl_sum / n,
            "kl_max": self.kl_max,
            "top1_agreement": self.top1_same / n,
            "tokens": n,
            "windows": self.windows,
            "seq_len": seq_len,
        }


def _log_result(out: dict[str, Any]) -> None:
    log.info(
        "KL %.5f, top-1 %.4f, ppl %.4f (reference %.4f) over %d tokens",
        out["kl_mean"], out["top1_agreement"], out["ppl"], out["ref_ppl"], out["tokens"],
    )


def compare_to_reference(
    ref_model: Any,
    model: Any,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Candidate vs reference in one pass over the protocol's windows (both models run on each batch).

    Returns ``{"ppl", "nll_mean", "nll_sum", "ref_ppl", "ref_nll_mean", "ppl_increase_pct", "kl_mean",
    "kl_max", "top1_agreement", "tokens", "windows", "seq_len"}``; ``tokens`` is the number of predicted
    tokens, ``kl_mean`` in nats per token, ``top1_agreement`` a fraction in [0, 1]. Memory: one batch of
    logits per model, never the whole text's.
    """
    ids = _check_stream(ids, seq_len, batch_size)
    windows = window_spans(ids.numel(), seq_len)
    acc = _Divergence()
    ref_iter = iter_window_logprobs(ref_model, ids, windows, batch_size)
    cand_iter = iter_window_logprobs(model, ids, windows, batch_size, progress)
    for (_w, ref_lp, _t), (_w2, lp, targets) in zip(ref_iter, cand_iter, strict=True):
        acc.add(ref_lp, lp, targets)
    out = acc.result(seq_len)
    _log_result(out)
    return out


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class ReferenceLogprobs:
    """The reference model's log-probs at every scored position of one token stream, computed once.

    Iterating yields ``(window, log-probs [n_scored, vocab] float32 on CPU)`` in window order. With a
    ``folder`` the log-probs live on disk (one safetensors file per window, read back one at a time),
    otherwise in memory. ``dtype=torch.float16`` halves the storage at a cost in precision (log-probs near
    -20 keep ~0.01 nats): the default float32 makes cached and one-pass results identical.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        seq_len: int,
        nll_sum: float,
        windows: list[Window],
        folder: Path | None,
        stored: list[torch.Tensor] | None,
    ) -> None:
        self.ids = ids
        self.seq_len = seq_len
        self.nll_sum = nll_sum
        self.windows = windows
        self.folder = folder
        self._stored = stored

    @property
    def tokens(self) -> int:
        return sum(w.n_scored for w in self.windows)

    @property
    def ppl(self) -> float:
        return safe_exp(self.nll_sum / self.tokens)

    @classmethod
    def compute(
        cls,
        ref_model: Any,
        ids: torch.Tensor,
        seq_len: int,
        batch_size: int = 4,
        folder: Path | str | None = None,
        dtype: torch.dtype = torch.float32,
        progress: Progress | None = None,
    ) -> ReferenceLogprobs:
        """Run the reference once over the protocol's windows and keep its log-probs (in ``folder`` if given)."""
        from safetensors.torch import save_file

        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"reference log-probs are stored as float32 or float16, not {dtype}")
        ids = _check_stream(ids, seq_len, batch_size)
        windows = window_spans(ids.numel(), seq_len)
        folder = Path(folder) if folder is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        stored: list[torch.Tensor] | None = None if folder is not None else []
        nll_sum = 0.0
        for k, (_w, lp, targets) in enumerate(iter_window_logprobs(ref_model, ids, windows, batch_size, progress)):
            nll_sum -= float(lp.gather(-1, targets[:, None]).double().sum())
            lp = lp.to("cpu", dtype).contiguous()
            if folder is None:
                stored.append(lp)
            else:
                save_file({"logprobs": lp}, str(folder / REFERENCE_WINDOW.format(k)))
        if folder is not None:
            save_file({"ids": ids.contiguous()}, str(folder / REFERENCE_IDS))
            meta = {
                "version": REFERENCE_VERSION,
                "seq_len": seq_len,
                "nll_sum": nll_sum,
                "ids_sha256": _ids_sha256(ids),
                "dtype": str(dtype).removeprefix("torch."),
                "windows": [[w.start, w.end, w.first_scored] for w in windows],
            }
            (folder / REFERENCE_META).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it complete
        return cls(ids, seq_len, nll_sum, windows, folder, stored)

    @classmethod
    def load(cls, folder: Path | str) -> ReferenceLogprobs:
        """Open reference log-probs that ``compute(..., folder=folder)`` wrote (possibly in another process)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / REFERENCE_META).read_text())
            ids = load_file(str(folder / REFERENCE_IDS))["ids"]
        except (OSError, ValueError, KeyError) as e:
            raise StageError(
                f"The reference log-probs in {folder} are missing or incomplete ({e}). They are written by "
                "ReferenceLogprobs.compute(..., folder=...); delete the folder and run the evaluation again."
            ) from e
        if meta.get("version") != REFERENCE_VERSION or meta.get("ids_sha256") != _ids_sha256(ids):
            raise StageError(
                f"The reference log-probs in {folder} were written by another version or for other tokens "
                "than the ones stored beside them; delete the folder and run the evaluation again."
            )
        windows = [Window(*w) for w in meta["windows"]]
        return cls(ids, int(meta["seq_len"]), float(meta["nll_sum"]), windows, folder, None)

    def __iter__(self) -> Iterator[tuple[Window, torch.Tensor]]:
        from safetensors.torch import load_file

        for k, w in enumerate(self.windows):
            if self._stored is not None:
                lp = self._stored[k]
            else:
                lp = load_file(str(self.folder / REFERENCE_WINDOW.format(k)))["logprobs"]
            yield w, lp.float()


def compare_to_reference_logprobs(
    reference: ReferenceLogprobs,
    model: Any,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``compare_to_reference`` with the reference's log-probs read back instead of recomputed.

    The candidate runs on ``reference.ids`` with ``reference.seq_len``; same result keys.
    """
    ids = _check_stream(reference.ids, reference.seq_len, batch_size)
    acc = _Divergence()
    cand_iter = iter_window_logprobs(model, ids, reference.windows, batch_size, progress)
    for (_w, ref_lp), (_w2, lp, targets) in zip(reference, cand_iter, strict=True):
        acc.add(ref_lp, lp, targets)
    # The reference NLL recomputed from stored float16 log-probs would be rounded; the sum kept at
    # compute time is the exact float32 one.
    out = acc.result(reference.seq_len, ref_nll_sum=reference.nll_sum)
    _log_result(out)
    return out

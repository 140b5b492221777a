"""AWQ's calibration statistics, as plain tensor functions: each input channel's mean |x| (paper eq. 5's ``s_X``),
the weight's per-column magnitude (AutoAWQ's duo scaling), an evenly strided token sample, and
:class:`StreamingInputs`, which reduces a layer's calibration inputs batch by batch to exactly what
``awq.search_scales`` needs (the sample, mean |x|, the Gram matrix), so a 70B-wide layer's tokens are never kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.errors import QuantizationError

# Tokens per chunk when reducing over a large activation tensor: bounds the fp32 temporary to ~chunk × width.
_CHUNK_TOKENS = 16384
# Tokens per GEMM when summing the Gram matrix XᵀX of a narrow input (the Gram form of the scale-search loss).
_GRAM_CHUNK = 8192

# ---------------------------------------------------------------------------------------------------------------
# Activation statistics
# ---------------------------------------------------------------------------------------------------------------


def _flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., in] -> [tokens, in] (a view when possible)."""
    return x.reshape(-1, x.shape[-1])


def _abs_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of |x| over tokens in fp32, chunked so a half-precision input is never copied whole."""
    x = _flatten_tokens(x)
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_TOKENS):
        total += x[start : start + _CHUNK_TOKENS].float().abs().sum(dim=0)
    return total


def input_channel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel, fp32 [in]: AWQ's activation salience (AutoAWQ ``x_mean``)."""
    n_tokens = _flatten_tokens(x).shape[0]
    if n_tokens == 0:
        raise QuantizationError(
            "AWQ got an empty activation tensor: no calibration tokens reached this layer. "
            "Check that the calibration set is not empty and that its samples are at least one token long."
        )
    return _abs_sum(x) / n_tokens


def update_magnitude(acc: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold one batch ``x`` [..., in] into a running mean |x| per channel.

    ``acc`` is the mean over the ``count`` tokens seen so far (None before the first batch). Returns the new
    mean and token count; after the last batch ``acc`` is :func:`input_channel_magnitude` of all batches.
    """
    n_new = _flatten_tokens(x).shape[0]
    batch_sum = _abs_sum(x)
    if acc is None or count == 0:
        if n_new == 0:
            return torch.zeros_like(batch_sum), 0
        return batch_sum / n_new, n_new
    total = count + n_new
    # Merge through the sums (mean * count), not an incremental difference: one rounding per batch.
    return (acc.float() * count + batch_sum) / total, total


def _sample_stride(n_tokens: int, max_tokens: int) -> int:
    """The row stride of :func:`_subsample_tokens` for ``n_tokens`` rows (1: every row)."""
    if max_tokens <= 0 or n_tokens <= max_tokens:
        return 1
    return -(-n_tokens // max_tokens)  # ceil: the strided view has at most max_tokens rows


def _direct_tokens(n_tokens: int, max_tokens: int) -> int:
    """How many tokens the output loss of :func:`search_scales` would see directly (its Gram form takes over when
    the input is narrower than this)."""
    return min(n_tokens, max_tokens) if max_tokens > 0 else n_tokens


def _subsample_tokens(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``x`` [tokens, in], evenly strided (deterministic, like AutoAWQ's clip)."""
    step = _sample_stride(x.shape[0], max_tokens)
    return x if step == 1 else x[::step]


class StreamingInputs:
    """One LinearGroup's calibration inputs, reduced batch by batch to what the AWQ searches read, instead of kept
    whole (at 70B width and 128 x 512 tokens the four groups' inputs are 6.5 GiB, and their concatenation another
    3.5 GiB for down_proj's).

    ``finish()`` returns ``(sample, magnitude, gram, n_tokens)``, each bit for bit what the full-tensor functions give
    on the concatenated batches: ``sample = _subsample_tokens(x, max_tokens)`` (the stride is known up front from
    ``n_tokens``, the number of tokens the walk will feed), ``magnitude = input_channel_magnitude(x)`` and, when the
    input is narrower than the token sample (where :func:`search_scales` uses the Gram loss), ``gram = XᵀX / n``.
    The sums run over the same ``_CHUNK_TOKENS``-row chunks (``_GRAM_CHUNK`` rows for the Gram matrix) as those
    functions, so up to one chunk of rows is buffered (0.9 GiB for a 28672-wide bf16 input; 0.25 GiB at 8192)."""

    def __init__(self, n_tokens: int, max_tokens: int):
        self.n_tokens, self.max_tokens = n_tokens, max_tokens
        self.step = _sample_stride(n_tokens, max_tokens)
        self.seen = 0
        self._buf: torch.Tensor | None = None
        self._fill = 0
        self._abs: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = _flatten_tokens(x)
        width = x.shape[1]
        if self._abs is None:
            if width < _direct_tokens(self.n_tokens, self.max_tokens):  # search_scales will use the Gram loss
                self._gram = torch.zeros(width, width, dtype=torch.float32, device=x.device)
            self._abs = torch.zeros(width, dtype=torch.float32, device=x.device)
        if self._buf is None:
            # whole chunks of both sums fit the buffer (16384 rows with the defaults)
            rows = math.lcm(_CHUNK_TOKENS, _GRAM_CHUNK) if self._gram is not None else _CHUNK_TOKENS
            self._buf = torch.empty(min(rows, max(1, self.n_tokens)), width, dtype=x.dtype, device=x.device)
        first = (-self.seen) % self.step  # rows of this batch at global positions 0, step, 2·step, ...
        if first < x.shape[0]:
            self._samples.append(x[first :: self.step].clone())
        self.seen += x.shape[0]
        while x.shape[0]:
            take = min(x.shape[0], self._buf.shape[0] - self._fill)
            self._buf[self._fill : self._fill + take] = x[:take]
            self._fill += take
            x = x[take:]
            if self._fill == self._buf.shape[0]:
                self._flush()
        if self.seen >= self.n_tokens:  # the walk's last batch: no rows to wait for, free the buffer now
            if self._fill:
                self._flush()
            self._buf = None

    def _flush(self) -> None:
        chunk = self._buf[: self._fill]
        for i in range(0, chunk.shape[0], _CHUNK_TOKENS):  # as _abs_sum: one sum per _CHUNK_TOKENS rows
            self._abs += chunk[i : i + _CHUNK_TOKENS].float().abs().sum(dim=0)
        if self._gram is not None:
            for i in range(0, chunk.shape[0], _GRAM_CHUNK):  # as _gram: one GEMM per _GRAM_CHUNK rows, in order
                xc = chunk[i : i + _GRAM_CHUNK].to(torch.float32)
                self._gram.addmm_(xc.t(), xc)
        self._fill = 0

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        if self.seen == 0:
            raise QuantizationError(
                "AWQ got an empty activation tensor: no calibration tokens reached this layer. "
                "Check that the calibration set is not empty and that its samples are at least one token long."
            )
        if self.seen != self.n_tokens:
            raise QuantizationError(
                f"AWQ was told the walk feeds {self.n_tokens} calibration tokens per layer but got {self.seen}: "
                "the token sample would not be the one the searches expect. This is a bug in the layer walker."
            )
        if self._buf is not None and self._fill:
            self._flush()
        self._buf = None
        sample = self._samples[0] if len(self._samples) == 1 else torch.cat(self._samples)
        self._samples = []
        gram = None if self._gram is None else self._gram / self.seen
        return sample, self._abs / self.seen, gram, self.seen


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's max |W|, fp32 [in] (AutoAWQ ``w_mean``)."""
    w = torch.cat(list(weights), dim=0).float()  # one fp32 copy, worked on in place (same values as out of place)
    out_features, in_features = w.shape
    g = group_size if group_size > 0 else in_features
    grouped = w.abs_().reshape(out_features, in_features // g, g)
    grouped.div_(grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return w.mean(dim=0)

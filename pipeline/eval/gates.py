"""Quality gates: compare a variant's evaluation metrics with the recipe's thresholds.

``check_gates`` returns one line per failed gate (empty list: all passed); the evaluate stage raises
``GateFailed`` with them. A gate whose metric was not measured, or is NaN, fails: a gate never passes by
default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

GATES = ("max_ppl_increase_pct", "max_kl", "min_top1_agreement", "max_repetition", "min_eos_rate",
         "min_reference_overlap")
# Generation-sanity gates: (metrics["sanity"] key, what it is, True for a maximum / False for a minimum).
_SANITY_GATES = {
    "max_repetition": ("repetition", "repeated 4-gram rate of greedy generations", True),
    "min_eos_rate": ("eos_rate", "EOS rate of greedy generations", False),
    "min_reference_overlap": ("reference_overlap", "token overlap with the reference's generations", False),
}


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def check_gates(metrics: Mapping[str, Any], gates: Mapping[str, Any] | Any) -> list[str]:
    """One message per failed gate, e.g. ``"gate max_kl failed: KL divergence 0.0412 > 0.0300"``.

    ``metrics`` holds what ``compare_to_reference`` returns (``ppl``, ``ref_ppl``, ``kl_mean``,
    ``top1_agreement``); ``gates`` maps gate names to thresholds (None = not set), as a dict or the
    recipe's ``GatesSection``. Gates: ``max_ppl_increase_pct`` (perplexity increase over the reference,
    in %), ``max_kl`` (mean KL divergence to the reference, nats/token), ``min_top1_agreement`` (fraction
    of tokens whose top-1 prediction matches the reference, 0..1); on ``metrics["sanity"]``
    (``pipeline.eval.sanity``): ``max_repetition`` (repeated n-gram rate), ``min_eos_rate`` (share of
    generations that stopped), ``min_reference_overlap`` (token F1 with the reference's generations). A figure
    equal to its threshold passes.
    """
    if hasattr(gates, "model_dump"):
        gates = gates.model_dump()
    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        raise ValueError(f"unknown quality gate(s) {', '.join(unknown)}; the gates are {', '.join(GATES)}")
    failures: list[str] = []

    limit = gates.get("max_ppl_increase_pct")
    if limit is not None:
        ppl, ref_ppl = _number(metrics, "ppl"), _number(metrics, "ref_ppl")
        if ppl is None or ref_ppl is None:
            failures.append(
                "gate max_ppl_increase_pct failed: the perplexity increase was not measured "
                "(the evaluation has no reference perplexity)"
            )
        else:
            increase = 100.0 * (ppl / ref_ppl - 1.0)
            # A derived figure: 100 * (10.5 / 10 - 1) is 5.000000000000004, which must pass a 5% gate.
            if not increase <= limit + 1e-9 * max(1.0, abs(limit)):  # written so that NaN fails
                failures.append(
                    f"gate max_ppl_increase_pct failed: perplexity increase {_fmt(increase, 2)}% > "
                    f"{_fmt(float(limit), 2)}% (perplexity {_fmt(ppl)}, reference {_fmt(ref_ppl)})"
                )

    limit = gates.get("max_kl")
    if limit is not None:
        kl = _number(metrics, "kl_mean")
        if kl is None:
            failures.append("gate max_kl failed: KL divergence was not measured (the evaluation has no reference)")
        elif not kl <= limit:
            failures.append(f"gate max_kl failed: KL divergence {_fmt(kl)} > {_fmt(float(limit))}")

    limit = gates.get("min_top1_agreement")
    if limit is not None:
        top1 = _number(metrics, "top1_agreement")
        if top1 is None:
            failures.append(
                "gate min_top1_agreement failed: top-1 agreement was not measured (the evaluation has no reference)"
            )
        elif not top1 >= limit:
            failures.append(f"gate min_top1_agreement failed: top-1 agreement {_fmt(top1)} < {_fmt(float(limit))}")

    sanity = metrics.get("sanity") or {}
    for gate, (key, what, is_max) in _SANITY_GATES.items():
        limit = gates.get(gate)
        if limit is None:
            continue
        value = sanity.get(key)
        if value is None:
            why = sanity.get("not_measured") or "the evaluation ran no generation sanity check; set eval.sanity: true"
            failures.append(f"gate {gate} failed: the {what} was not measured: {why}")
        elif is_max and not float(value) <= limit:
            failures.append(f"gate {gate} failed: {what} {_fmt(float(value))} > {_fmt(float(limit))}")
        elif not is_max and not float(value) >= limit:
            failures.append(f"gate {gate} failed: {what} {_fmt(float(value))} < {_fmt(float(limit))}")

    return failures

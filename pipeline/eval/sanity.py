"""Generation sanity: greedy generations on a fixed prompt set, scored for what perplexity misses.

A quantized model can keep its perplexity and still repeat one phrase, never stop, or drift from what the
original model says. Each prompt of a shipped set (``data/prompts/sanity.jsonl``: one JSON object a line,
``{"id", "messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's chat template) is answered
greedily by the reference and by the deployable model, up to ``max_new_tokens`` tokens, and scored with the
pure functions below. Figures (``score_generations``):

- ``repetition``: mean over prompts of ``repeated_ngram_rate`` (0 = no n-gram repeated, near 1 = a loop);
- ``eos_rate``: fraction of prompts whose generation emitted an end-of-sequence token within the limit;
- ``reference_overlap``: mean over prompts of ``token_overlap`` with the reference's generation (1 = same
  tokens); ``identical``: fraction of prompts whose generation equals the reference's token for token.

Decoding (``greedy_generate``): transformers models through ``generate`` (greedy, one beam, no repetition
penalty or other processors, whatever the model's ``generation_config`` says); any other
``model(input_ids) -> logits`` runtime through a plain loop (argmax of the last position, the whole sequence
re-run each step: no KV cache, fine for small models and short limits).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RecipeError
from pipeline.eval.perplexity import model_device, model_logits, prefix_token_id

from pipeline.textdata import SHIPPED_PROMPTS  # noqa: E402  (one definition, light to import)
NGRAM = 4


def strip_eos(tokens: Sequence[int], eos_ids: Iterable[int]) -> list[int]:
    """The tokens before the first end-of-sequence token (all of them if there is none)."""
    eos = set(eos_ids)
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(int(t))
    return out


def repeated_ngram_rate(tokens: Sequence[int], n: int = NGRAM) -> float:
    """Fraction of the ``n``-grams of ``tokens`` that repeat an earlier ``n``-gram of the same sequence.

    With ``N = len(tokens) - n + 1`` n-grams (positions ``i .. i+n-1``) of which ``D`` are distinct, the rate
    is ``(N - D) / N``: 0.0 when every n-gram is new, ``(N-1)/N`` when one token is repeated throughout.
    A sequence shorter than ``n`` has no n-gram and rates 0.0. Pass the tokens without the EOS.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else (len(grams) - len(set(grams))) / len(grams)


def reached_eos(tokens: Sequence[int], eos_ids: Iterable[int]) -> bool:
    """True if the generation ``tokens`` (at most ``max_new_tokens`` of them) contains an EOS token, i.e. the
    model chose to stop within the limit rather than being cut off by it."""
    eos = set(eos_ids)
    return any(t in eos for t in tokens)


def token_overlap(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Token F1 of two generations (EOS stripped): ``2 * |A ∩ B| / (|A| + |B|)`` over token multisets.

    ``|A ∩ B|`` counts each token id ``min(count in A, count in B)`` times (SQuAD's token F1, on token ids).
    1.0 for the same tokens in any order, 0.0 for no token in common; two empty generations give 1.0.
    """
    if not tokens and not reference:
        return 1.0
    common = sum((Counter(tokens) & Counter(reference)).values())
    return 2.0 * common / (len(tokens) + len(reference))


def load_prompts(path: Path | str = SHIPPED_PROMPTS) -> list[dict[str, Any]]:
    """The prompt set: ``[{"id", "messages"}, ...]``; a malformed line is a RecipeError naming it."""
    path = Path(path)
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RecipeError(f"Cannot read the sanity prompt set {path} ({e}); set eval.sanity_prompts to a JSONL file "
                          "of {\"id\", \"messages\"} objects, or leave it unset for the shipped set.") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            msgs = row["messages"]
            ok = isinstance(msgs, list) and msgs and all(isinstance(m.get("content"), str) for m in msgs)
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise RecipeError(f"{path}:{i} is not a prompt: each line must be a JSON object with \"messages\", a "
                              "non-empty list of {\"role\", \"content\"} objects (chat format).")
        prompts.append({"id": str(row.get("id", i)), "messages": msgs})
    if not prompts:
        raise RecipeError(f"The sanity prompt set {path} holds no prompt.")
    return prompts


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt: the tokenizer's chat template with the assistant turn opened; without a
    template, the prefix token and the messages' contents one per line."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    ids = list(tokenizer.encode("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=False))
    prefix = prefix_token_id(tokenizer)
    return ([prefix] if prefix is not None else []) + ids


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokenizer's EOS, and the model's ``generation_config.eos_token_id`` (int or list) if it has one."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if t is not None:
            ids.add(int(t))
    return sorted(ids)


def greedy_generate(model: Any, ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int]) -> list[int]:
    """Greedy continuation of ``ids``: at most ``max_new_tokens`` new tokens, stopping after the first EOS
    (which is included). See the module docstring for the two decoding paths."""
    device = model_device(model)
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    eos = set(eos_ids)
    with torch.no_grad():
        if hasattr(model, "generate") and hasattr(model, "config"):
            from transformers import GenerationConfig

            cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                   eos_token_id=list(eos) or None, pad_token_id=next(iter(eos), 0))
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
            new = [int(t) for t in out[0, x.shape[1]:]]
        else:
            new = []
            for _ in range(max_new_tokens):
                nxt = int(model_logits(model, x)[0, -1].argmax())
                new.append(nxt)
                if nxt in eos:
                    break
                x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    for i, t in enumerate(new):  # generate pads after EOS in a batch; keep up to the first EOS
        if t in eos:
            return new[: i + 1]
    return new


def generate_all(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], max_new_tokens: int,
                 eos_ids: Sequence[int], progress: Any = None) -> list[dict[str, Any]]:
    """``[{"id", "tokens", "text"}]``: the greedy generation of each prompt (``tokens`` include a final EOS)."""
    out = []
    for k, p in enumerate(prompts):
        tokens = greedy_generate(model, prompt_ids(tokenizer, p["messages"]), max_new_tokens, eos_ids)
        out.append({"id": p["id"], "tokens": tokens,
                    "text": tokenizer.decode(strip_eos(tokens, eos_ids), skip_special_tokens=True)})
        if progress:
            progress(k + 1, len(prompts))
    return out


def score_generations(outputs: list[dict[str, Any]], reference: list[dict[str, Any]] | None,
                      eos_ids: Sequence[int], max_new_tokens: int, n: int = NGRAM) -> dict[str, Any]:
    """The sanity figures of one model's generations (see the module docstring); without ``reference``,
    ``reference_overlap`` and ``identical`` are None."""
    if reference is not None and [o["id"] for o in outputs] != [r["id"] for r in reference]:
        raise ValueError("the generations and the reference's are not of the same prompts")
    bodies = [strip_eos(o["tokens"], eos_ids) for o in outputs]
    out: dict[str, Any] = {
        "repetition": sum(repeated_ngram_rate(b, n) for b in bodies) / len(bodies),
        "eos_rate": sum(reached_eos(o["tokens"], eos_ids) for o in outputs) / len(outputs),
        "reference_overlap": None,
        "identical": None,
        "mean_tokens": sum(len(o["tokens"]) for o in outputs) / len(outputs),
        "prompts": len(outputs),
        "max_new_tokens": max_new_tokens,
        "ngram": n,
    }
    if reference is not None:
        refs = [strip_eos(r["tokens"], eos_ids) for r in reference]
        out["reference_overlap"] = sum(token_overlap(b, r) for b, r in zip(bodies, refs)) / len(bodies)
        out["identical"] = sum(o["tokens"] == r["tokens"] for o, r in zip(outputs, reference)) / len(outputs)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def prompts_sha256(prompts: list[dict[str, Any]]) -> str:
    """Fingerprint of a prompt set's content (ids and messages), for cache keys."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()

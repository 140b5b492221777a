"""Regenerate ``pydocs_cloze.jsonl`` from the shipped held-out text (deterministic: same input, same bytes).

    python data/tasks/make_pydocs_cloze.py

Each item: ``context`` (up to 40 words of a prose paragraph of ``data/eval/pydocs-heldout.txt``), four
``choices`` (the paragraph's real next six words, and three other orders of the same six words),
``label`` (index of the real continuation). Chance accuracy is 1/4. See README.md in this folder.

The distractors are the answer's own words shuffled, so every choice has the same words (and nearly the
same tokens and length): a model can tell the real one only from word order in context, not from word
frequencies or length.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "eval" / "pydocs-heldout.txt"
OUT = HERE / "pydocs_cloze.jsonl"
SPAN, CONTEXT, CHOICES, SEED = 6, 40, 4, 20261130


def prose_paragraphs(text: str) -> list[list[str]]:
    """Paragraphs of running prose as word lists: code blocks (indented lines, ``>>>``) and short lines skipped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(ln.startswith((" ", "\t")) or ">>>" in ln for ln in lines):
            continue
        words = " ".join(lines).split()
        if len(words) >= 20:
            out.append(words)
    return out


def main() -> None:
    rng = random.Random(SEED)
    paras = prose_paragraphs(SOURCE.read_text(encoding="utf-8"))
    items = []
    for words in paras:
        cut = rng.randint(12, len(words) - SPAN)
        span = words[cut : cut + SPAN]
        if len(set(span)) < 4:  # too few distinct words for three distinct other orders
            continue
        answer = " " + " ".join(span)
        choices = {answer}
        while len(choices) < CHOICES:
            choices.add(" " + " ".join(rng.sample(span, len(span))))
        choices = sorted(choices - {answer})
        label = rng.randrange(CHOICES)
        choices.insert(label, answer)
        items.append({"id": len(items), "context": " ".join(words[max(0, cut - CONTEXT) : cut]),
                      "choices": choices, "label": label})
    OUT.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    print(f"{len(items)} items from {len(paras)} paragraphs -> {OUT}")


if __name__ == "__main__":
    main()

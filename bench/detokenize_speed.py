"""What the server's scheduler spends in the tokenizer per generated token: decoding the whole reply again at
every step (the scheduler before pipeline/serve/detokenize.py) against :class:`IncrementalText`'s two short
windows, at reply lengths of 100 to 2,000 tokens, with the shipped tokenizer (or ``--model``).

    python bench/detokenize_speed.py [--model DIR] [--json OUT]

Prints a table (microseconds per token at each length, averaged over the last 50 tokens of the reply) and writes
the figures as JSON. CPU only; no model weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (100, 500, 1000, 2000)
TAIL = 50  # tokens timed at the end of each reply


def _reply_ids(tok, n: int) -> list[int]:
    text = (ROOT / "data" / "corpus" / "train.txt").read_text(encoding="utf-8")
    ids = tok(text[: 40 * n], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the corpus gives {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def per_token_us(decode_step, ids: list[int]) -> float:
    """Microseconds per token over the reply's last TAIL tokens (the first n - TAIL are fed untimed)."""
    n = len(ids)
    for k in range(1, n - TAIL + 1):
        decode_step(ids[:k])
    t0 = time.perf_counter()
    for k in range(n - TAIL + 1, n + 1):
        decode_step(ids[:k])
    return 1e6 * (time.perf_counter() - t0) / TAIL


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from pipeline.serve.detokenize import IncrementalText

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama-pydocs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for n in LENGTHS:
        ids = _reply_ids(tok, n)
        whole = per_token_us(decode, ids)
        inc = IncrementalText(decode)
        windows = per_token_us(inc.update, ids)
        assert inc.text + inc.pending == decode(ids)
        rows.append(dict(reply_tokens=n, whole_reply_us=whole, windows_us=windows, ratio=whole / windows))
    print("| reply tokens | whole reply each step, us/token | two windows, us/token | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['reply_tokens']} | {r['whole_reply_us']:.1f} | {r['windows_us']:.1f} | {r['ratio']:.1f}x |")
    if a.json:
        a.json.write_text(json.dumps(dict(rows=rows, tokenizer=str(a.model), python=platform.python_version(),
                                          machine=platform.processor() or platform.machine()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

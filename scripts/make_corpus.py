"""Build the shipped text corpus from the Python 3.11 documentation sources.

Source: Debian package ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``), i.e. the
reStructuredText sources of the official Python documentation, licensed under the PSF License
Agreement (Python Software Foundation License, version 2). See ``data/README.md``.

Run (once, on a Debian machine; its outputs are committed, so nobody needs to run it again)::

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/make_corpus.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources

Markup is lightly stripped (roles, directives, index entries) so the text reads as prose and code.
Documents are joined with a blank line; the three splits share no document.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTIONS = ("tutorial", "howto", "reference", "faq")
EVAL_DOCS = {"faq/design", "faq/general", "howto/sorting", "tutorial/floatingpoint"}
CALIB_DOCS = {"faq/library", "faq/extending", "howto/enum"}

ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
DIRECTIVE = re.compile(r"^\s*\.\. ")


def clean(text: str) -> str:
    out: list[str] = []
    skip_indented = False
    for line in text.splitlines():
        if DIRECTIVE.match(line):
            # Directive bodies (index entries, comments, targets) are indented: skip them too.
            skip_indented = not line.rstrip().endswith("::") or "index::" in line
            continue
        if skip_indented:
            if line.startswith(" ") or not line.strip():
                continue
            skip_indented = False
        if re.fullmatch(r"[=\-*^~#+|]{3,}.*", line.strip()):
            continue  # section underlines and table rules
        line = ROLE.sub(r"\1", line).replace("``", "")
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def main(src: str, dest: str = "data") -> None:
    root = Path(src)
    splits: dict[str, list[str]] = {"train": [], "eval": [], "calib": []}
    for section in SECTIONS:
        for path in sorted((root / section).glob("*.rst.txt")):
            doc = f"{section}/{path.name.removesuffix('.rst.txt')}"
            if doc.endswith("/index"):
                continue
            split = "eval" if doc in EVAL_DOCS else "calib" if doc in CALIB_DOCS else "train"
            splits[split].append(clean(path.read_text(encoding="utf-8")))
    Path(dest, "corpus").mkdir(parents=True, exist_ok=True)
    Path(dest, "corpus", "train.txt").write_text("\n\n".join(splits["train"]) + "\n", encoding="utf-8")
    Path(dest, "eval").mkdir(parents=True, exist_ok=True)
    Path(dest, "eval", "pydocs-heldout.txt").write_text("\n\n".join(splits["eval"]) + "\n", encoding="utf-8")
    Path("calibration").mkdir(exist_ok=True)
    Path("calibration", "pydocs-calib.txt").write_text("\n\n".join(splits["calib"]) + "\n", encoding="utf-8")
    for name, docs in splits.items():
        print(name, len(docs), "documents", sum(map(len, docs)), "characters")


if __name__ == "__main__":
    main(*sys.argv[1:])

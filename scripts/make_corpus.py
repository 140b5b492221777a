"""Build the shipped text corpus from the Python 3.11 documentation sources.

Source: Debian package ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``), i.e. the
reStructuredText sources of the official Python documentation, licensed under the PSF License
Agreement (Python Software Foundation License, version 2). See ``data/README.md``.

Run (once, on a Debian machine; its outputs are committed, so nobody needs to run it again)::

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/make_corpus.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources             # three splits
    python scripts/make_corpus.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources --extended  # + extended

Markup is lightly stripped (roles, directives, index entries) so the text reads as prose and code.
Documents are joined with a blank line; the three splits share no document. ``--extended`` also writes
``corpus/train-extended.txt.gz``: the training documents followed by the library reference, the
what's-new pages and the other manuals in EXTENDED_SECTIONS, never a document of the eval or calibration
split; those pages go through ``clean_reference``, which keeps the API descriptions that ``clean`` drops.
It is gzipped with mtime 0 and no file name in the header, so the same sources give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

SECTIONS = ("tutorial", "howto", "reference", "faq")
# Only for the extended corpus; appended after SECTIONS in this order. A missing section is skipped.
EXTENDED_SECTIONS = ("library", "whatsnew", "using", "extending", "c-api", "distributing", "installing")
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


# The library reference keeps most of its text in the bodies of object descriptions (``.. function:: f(x)``
# followed by an indented paragraph), which ``clean`` drops with every other directive body. The extended
# sections therefore go through ``clean_reference``, which keeps those bodies under a line with the
# signature, the way the rendered page shows them; ``clean`` stays as it was, so the three splits do too.
NAMED_DIRECTIVE = re.compile(r"^(\s*)\.\. ([a-z][a-z:-]*)::\s*(.*)$")
DIRECTIVE_OPTION = re.compile(r"^\s+:[a-zA-Z-]+:(\s.*)?$")
OBJECT_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod", "classmethod",
    "staticmethod", "coroutinefunction", "coroutinemethod", "abstractmethod", "opcode", "cmdoption", "option",
    "envvar", "describe", "pdbcommand", "c:function", "c:member", "c:type", "c:var", "c:macro", "c:struct",
}  # header line: the signature
LABEL_DIRECTIVES = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "impl-detail": "CPython implementation detail:",
    "attention": "Attention:", "important": "Important:", "tip": "Tip:", "hint": "Hint:", "caution": "Caution:",
    "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:", "availability": "Availability: {}.",
}  # header line: what Sphinx renders
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode"}  # no header line, body kept
# Every other directive (index, module, toctree, audit-event, testsetup, comments, targets, ...) is dropped
# with its body, as in ``clean``.


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def clean_reference(text: str) -> str:
    """Like ``clean``, but keeps the bodies of object descriptions, admonitions and code directives."""
    out: list[str] = []
    skip_deeper_than: int | None = None  # dropping a directive body: lines indented more than its directive
    header_pad: str | None = None  # in a kept directive's options (and an object's signature continuations)
    signature = False  # that directive describes an object: lines before the first blank one are signatures
    for line in text.splitlines():
        if skip_deeper_than is not None:
            if not line.strip() or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if header_pad is not None:
            if not line.strip():
                header_pad = None
            elif DIRECTIVE_OPTION.match(line):
                continue  # :noindex:, :synopsis: ... are Sphinx settings, not text
            elif signature and not DIRECTIVE.match(line):
                out.append(header_pad + ROLE.sub(r"\1", line.strip()).replace("``", ""))  # f(a) / f(a, b)
                continue
            else:
                header_pad = None  # a body that starts right under its directive (versionchanged:: 3.9 / text)
        if DIRECTIVE.match(line):
            match = NAMED_DIRECTIVE.match(line)
            name = match.group(2) if match else ""
            if name in OBJECT_DIRECTIVES or name in LABEL_DIRECTIVES or name in CODE_DIRECTIVES:
                pad, arg = match.group(1), match.group(3).strip()
                if name in OBJECT_DIRECTIVES:
                    head = arg
                elif name in LABEL_DIRECTIVES:
                    label = LABEL_DIRECTIVES[name]
                    head = label.format(arg) if "{}" in label else f"{label} {arg}".rstrip()
                else:
                    head = ""
                if head:
                    out.append(pad + ROLE.sub(r"\1", head).replace("``", ""))
                header_pad, signature = pad, name in OBJECT_DIRECTIVES
            else:
                skip_deeper_than = _indent(line)
            continue
        if re.fullmatch(r"[=\-*^~#+|]{3,}.*", line.strip()):
            continue  # section underlines and table rules
        out.append(ROLE.sub(r"\1", line).replace("``", "").rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def documents(root: Path, sections: tuple[str, ...], content_index: bool = False) -> list[tuple[str, Path]]:
    """(``section/name``, path) of every page of ``sections``, sorted within a section, index pages left out.

    An index page is a table of contents, except in ``distributing`` and ``installing``, whose index page is the
    whole guide; ``content_index`` keeps an index page that has no toctree.
    """
    docs = []
    for section in sections:
        for path in sorted((root / section).glob("*.rst.txt")):
            doc = f"{section}/{path.name.removesuffix('.rst.txt')}"
            if not doc.endswith("/index") or (content_index and ".. toctree::" not in path.read_text(encoding="utf-8")):
                docs.append((doc, path))
    return docs


def main(src: str, dest: str = "data", extended: bool = False) -> None:
    root = Path(src)
    splits: dict[str, list[str]] = {"train": [], "eval": [], "calib": []}
    for doc, path in documents(root, SECTIONS):
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
    if extended:
        write_extended(root, Path(dest, "corpus", "train-extended.txt.gz"), splits["train"])


def write_extended(root: Path, out: Path, train_docs: list[str]) -> None:
    """Training documents + EXTENDED_SECTIONS, as deterministic gzip (the text starts with train.txt's)."""
    # The held-out and calibration pages live in faq/howto/tutorial, so no extended section can hold one;
    # the check stays so that a future EXTENDED_SECTIONS entry cannot leak one into training.
    extra = [(doc, path) for doc, path in documents(root, EXTENDED_SECTIONS, content_index=True)
             if doc not in EVAL_DOCS | CALIB_DOCS]
    docs = train_docs + [clean_reference(path.read_text(encoding="utf-8")) for _, path in extra]
    data = ("\n\n".join(docs) + "\n").encode("utf-8")
    # mtime=0 and an empty file name keep the header free of the time and the path: same sources, same bytes.
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    sections = sorted({doc.split("/")[0] for doc, _ in extra}, key=EXTENDED_SECTIONS.index)
    print("train-extended", len(docs), "documents", sum(map(len, docs)), "characters",
          f"(train + {len(extra)} from {', '.join(sections)});", out.stat().st_size, "bytes gzipped")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="the _sources folder of the python3.11-doc package")
    p.add_argument("dest", nargs="?", default="data", help="the data folder (default: data)")
    p.add_argument("--extended", action="store_true", help="also write corpus/train-extended.txt.gz")
    args = p.parse_args()
    main(args.src, args.dest, args.extended)

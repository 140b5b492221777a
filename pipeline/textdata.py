"""Text sources for calibration and evaluation: local .txt/.jsonl/.parquet files or a ``datasets`` id.

Documents are joined with a blank line ("\\n\\n"), the usual protocol for perplexity and calibration streams.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import CalibrationError

# Shipped evaluation data (read by pipeline/eval/sanity.py and tasks.py; fingerprinted by pipeline/plan.py)
SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "sanity.jsonl"
SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "data" / "tasks"


def read_documents(source: str, path: Path, text_field: str = "text", split: str = "train", subset: str | None = None) -> list[str]:
    """The documents of a local file (``path``) or, when no such file exists, of the datasets id ``source``."""
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix in (".txt", ".md", ".text"):
                return [path.read_text(encoding="utf-8")]
            if suffix == ".jsonl":
                return [_field(json.loads(line), text_field, path, i + 1) for i, line in
                        enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
            if suffix == ".parquet":
                return _from_dataset("parquet", None, "train", text_field, data_files=str(path))
        except (UnicodeDecodeError, ValueError) as e:
            raise CalibrationError(f"cannot read {path}: {e}. Text sources must be UTF-8.") from None
        raise CalibrationError(f"{path}: unsupported text file type {suffix!r}; use .txt, .jsonl or .parquet.")
    if path.exists() or source.startswith((".", "/", "~")) or "/" not in source and "." in source:
        raise CalibrationError(f"text source {source!r} ({path}) is not a readable file.")
    return _from_dataset(source, subset, split, text_field)


def _field(row: dict, text_field: str, path: Path, line: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise CalibrationError(f"{path}:{line}: no string field {text_field!r}; set calibration.text_field.")
    return row[text_field]


def _from_dataset(source: str, subset: str | None, split: str, text_field: str, **kw) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"text source {source!r} is a datasets id but the 'datasets' package is not installed: "
            "pip install 'quantship[eval]', or use a local .txt/.jsonl file."
        ) from None
    try:
        ds = datasets.load_dataset(source, subset, split=split, **kw)
    except Exception as e:  # datasets raises many unrelated types for a missing/offline dataset
        raise CalibrationError(
            f"cannot load dataset {source!r} (subset {subset!r}, split {split!r}): {type(e).__name__}: {e}. "
            "Offline? Set HF_DATASETS_OFFLINE=1 with a cached copy, or use a local file."
        ) from None
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {source!r} has no column {text_field!r}; columns: {', '.join(ds.column_names)}.")
    return [t for t in ds[text_field] if t and t.strip()]


def join_documents(docs: list[str]) -> str:
    return "\n\n".join(d.strip("\n") for d in docs)

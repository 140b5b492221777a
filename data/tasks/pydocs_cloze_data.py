"""Loader of the pydocs_cloze task's local data (lm-eval ``custom_dataset``): no download, no HF cache."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "pydocs_cloze.jsonl"


def load(**_kwargs):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

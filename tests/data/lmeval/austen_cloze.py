"""The austen_cloze task's data: the JSONL file beside this one, read without the datasets cache."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

DATA = Path(__file__).with_name("austen_cloze.jsonl")


def load(**_: object) -> DatasetDict:
    """lm-eval calls this with the task's metadata as keywords; none of them changes the data."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})

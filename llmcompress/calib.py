"""Text sources for calibration and evaluation, tokenisation, and seeded window sampling.

A source is one of:

- ``austen:train`` / ``austen:test`` / ``austen:<novel>``: Jane Austen's novels, bundled
  (public domain). ``train`` holds emma, mansfieldpark, prideprejudice and sensesensibility;
  ``test`` holds persuasion and northangerabbey, so evaluation text is never calibration text.
- a path to a ``.txt`` file, or a ``.jsonl`` file whose lines are objects with a ``text`` field;
- ``hf:NAME[:CONFIG][:SPLIT]``: a ``datasets`` dataset (needs that package and a network).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .errors import CalibrationError

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_SPLITS = {
    "train": ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"),
    "test": ("persuasion", "northangerabbey"),
}
DEFAULT_EVALUATION = "austen:test"
# Tokenising a few MB in one call is slow and triggers length warnings; line-aligned chunks
# tokenise identically because pre-tokenisation already splits at whitespace.
_CHUNK_CHARS = 200_000


@lru_cache(maxsize=1)
def _austen_novels() -> dict[str, str]:
    raw = resources.files("llmcompress").joinpath("data/austen.txt.gz").read_bytes()
    novels: dict[str, list[str]] = {}
    current = None
    for line in gzip.decompress(raw).decode("utf-8").split("\n"):
        if line.startswith("#### "):
            current = line[5:].strip()
            novels[current] = []
        elif current is not None:
            novels[current].append(line)
    return {name: "\n".join(lines).strip() + "\n" for name, lines in novels.items()}


def read_text(source: str) -> str:
    """The raw text a source names."""
    source = source.strip()
    if source.startswith("austen:"):
        return _read_austen(source.split(":", 1)[1])
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:])
    path = Path(source).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"text source {source!r} is neither a bundled name (austen:train, austen:test, austen:<novel>), "
            "hf:NAME, nor an existing file: check the path"
        )
    if path.is_dir():
        raise CalibrationError(f"text source {source!r} is a directory: pass a .txt or .jsonl file")
    return _read_file(path)


def _read_austen(part: str) -> str:
    novels = _austen_novels()
    if part in AUSTEN_SPLITS:
        return "\n".join(novels[name] for name in AUSTEN_SPLITS[part])
    if part in novels:
        return novels[part]
    names = ", ".join(f"austen:{n}" for n in (*AUSTEN_SPLITS, *AUSTEN_NOVELS))
    raise CalibrationError(f"unknown bundled text 'austen:{part}'; available: {names}")


def _read_file(path: Path) -> str:
    try:
        data = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 first") from err
    if path.suffix.lower() != ".jsonl":
        return data
    texts = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{path}, line {number}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _read_hf_dataset(spec: str) -> str:
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibrationError(f"'hf:{spec}' should read hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:train")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError(f"'hf:{spec}' needs the 'datasets' package: pip install datasets (and a network)") from err
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (network, missing config, missing split)
        raise CalibrationError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {err}") from err
    if "text" not in dataset.column_names:
        raise CalibrationError(f"dataset {name!r} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return "\n\n".join(t for t in dataset["text"] if t)


def tokenize(text: str, tokenizer) -> Tensor:  # noqa: ANN001 - any Hugging Face tokenizer
    """Token ids [T] of a text, without special tokens."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    ids: list[int] = []
    if chunks:  # given no texts, a tokenizer fails instead of returning none
        for encoded in tokenizer(chunks, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int, label: str = "the text") -> Tensor:
    """``nsamples`` disjoint windows [nsamples, seqlen], drawn from the text's seqlen-aligned chunks;
    ``label`` names the text in a refusal."""
    available = tokens.numel() // seqlen
    if available == 0:
        longest = tokens.numel() // nsamples
        shorter = f", or shorter windows (--seqlen {longest} or less)" if longest > 1 else ""
        raise CalibrationError(f"{label} has {tokens.numel()} tokens, not enough for one window of {seqlen}: give a longer text "
                               f"({nsamples} x {seqlen} = {nsamples * seqlen} tokens are asked for){shorter}")
    if available < nsamples:
        raise CalibrationError(
            f"{label} has {tokens.numel()} tokens, which gives {available} window{'' if available == 1 else 's'} of {seqlen}; "
            f"{nsamples} x {seqlen} = {nsamples * seqlen} tokens were asked for: use more text, "
            "fewer samples (--nsamples) or shorter windows (--seqlen)"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples].sort().values
    return tokens[: available * seqlen].reshape(available, seqlen)[chosen].clone()


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> Tensor:  # noqa: ANN001
    """Read, tokenise and sample: the token windows [nsamples, seqlen] a compression run sees."""
    return sample_windows(tokenize(read_text(source), tokenizer), nsamples, seqlen, seed, label=f"calibration text {source}")

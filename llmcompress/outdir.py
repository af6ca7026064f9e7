"""The output directory of a run: the names llmcompress writes into one, and the checks made before
any work may go there. ``--overwrite`` replaces a directory only when everything in it is ours,
and a place the result cannot be written to or renamed into is refused at the start instead of
after hours of work."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import CheckpointError
from .fileio import incomplete_name
from .integrity import CHECKSUM_FILE
from .runstate import STATE_DIR
from .shards import INDEX_FILE, SINGLE_FILE

CONFIG_FILE = "config.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "compression_report.json"
REMOTE_CODE_FILE = "llmcompress_auto.py"  # transformers' way into a native checkpoint (autoload)
ADAPTER_DIR = "adapter"  # a serving export's low-rank branches, as a PEFT LoRA adapter


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to write over something unless asked, over what llmcompress did not write, or where
    the result cannot be put; called before any expensive work."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} is a file: choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"output directory {out} already exists and is not empty: pass --overwrite (overwrite=True) or choose another --out")
        check_only_ours(out)
    if os.path.ismount(out):
        raise CheckpointError(f"output directory {out} is a mount point, and a finished result is put in place by renaming it there: "
                              f"choose a directory inside it, e.g. --out {out / 'model'}")
    _check_writable(out)
    return out


def check_only_ours(directory: Path) -> None:
    """Refuse to remove ``directory`` when it holds anything llmcompress does not write."""
    foreign = sorted(set(os.listdir(directory)) - written_names(directory))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise CheckpointError(f"--overwrite replaces only what llmcompress wrote, and {directory} also holds {foreign[0]}{more}: "
                              "move it elsewhere, or choose another --out")


def written_names(directory: Path) -> set[str]:
    """The names that llmcompress's writers may have put in ``directory``: the checkpoint's own files,
    the shards its index names, what transformers writes for a tokenizer and a generation config,
    and the staging names of files replaced in place."""
    from transformers import tokenization_utils_base as tokenizer_files
    from transformers.utils import GENERATION_CONFIG_NAME

    names = {CONFIG_FILE, RECIPE_FILE, REPORT_FILE, REMOTE_CODE_FILE, CHECKSUM_FILE, SINGLE_FILE, INDEX_FILE, ADAPTER_DIR, STATE_DIR, GENERATION_CONFIG_NAME,
             tokenizer_files.TOKENIZER_CONFIG_FILE, tokenizer_files.SPECIAL_TOKENS_MAP_FILE, tokenizer_files.ADDED_TOKENS_FILE,
             tokenizer_files.FULL_TOKENIZER_FILE, tokenizer_files.CHAT_TEMPLATE_FILE, tokenizer_files.CHAT_TEMPLATE_DIR}
    names |= set(_read_json(directory / INDEX_FILE).get("weight_map", {}).values())
    names |= _vocabulary_files(directory)
    return names | {incomplete_name(name) for name in names}


def _vocabulary_files(directory: Path) -> set[str]:
    """The files the tokenizer class named in ``directory``'s tokenizer config saves its vocabulary to."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = _read_json(directory / "tokenizer_config.json").get("tokenizer_class")
    tokenizer_class = tokenizer_class_from_name(name) if isinstance(name, str) else None
    try:
        return set(getattr(tokenizer_class, "vocab_files_names", {}).values())
    except ImportError:  # a class whose backend is not installed here: transformers stands in a placeholder that raises
        return set()


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; empty when there is none to read (a file that is not ours then shows as foreign)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_writable(out: Path) -> None:
    """Create and remove a file where the run writes (beside ``out``: the staging directory,
    ``OUT.partial``, the lock), in the nearest directory that exists."""
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".llmcompress-probe-", dir=existing)
    except OSError as err:
        raise CheckpointError(f"cannot write in {existing} ({err.strerror or err}), where {out} would be made: "
                              "choose an --out in a directory you can write to") from err
    os.close(descriptor)
    os.unlink(probe)

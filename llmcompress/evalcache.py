"""A cache of float models' perplexities, so that a second run on the same model skips the
float evaluation (most of a quick start's time) and, from disk, even loading the whole model.

The key is everything the number depends on: the model's files (name, size and modification
time of each, so an edited or replaced file misses; hashing them would cost as much as
loading), the evaluation text (its content), the protocol (window length, window count, BOS),
the compute dtype asked for and what ``auto`` resolves to on this machine, the device type and
the torch version. An entry is one JSON file under ``cache_root()/perplexity``; deleting the
directory clears it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .evaluate import PerplexityResult
from .fileio import staged_file
from .models import cache_root
from .precision import native_bfloat16


def cache_dir() -> Path:
    return cache_root() / "perplexity"


def model_fingerprint(model_dir: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Name, size and modification time of every file of a model directory."""
    root = Path(model_dir)
    return sorted((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns)
                  for path in root.rglob("*") if path.is_file() for stat in (path.stat(),))


def cache_key(model_dir: str | os.PathLike, text: str, seqlen: int, windows: int | None, bos: bool, dtype: str,
              device: str) -> str:
    parts = {
        "model": model_fingerprint(model_dir), "text": hashlib.sha256(text.encode()).hexdigest(), "seqlen": seqlen,
        "windows": windows, "bos": bos, "dtype": dtype, "native_bfloat16": native_bfloat16(),
        "device": torch.device(device).type, "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_perplexity(key: str, compute: Callable[[], PerplexityResult]) -> tuple[PerplexityResult, bool]:
    """The result stored under ``key``, else ``compute()``'s, stored; and whether it came from the cache.
    An unreadable entry (an older layout, a torn write from another tool) is recomputed."""
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            return PerplexityResult(**json.loads(path.read_text())), True
        except (OSError, ValueError, TypeError):
            pass  # recomputed and rewritten below
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as staging:
        staging.write_text(json.dumps(asdict(result)))
    return result, False

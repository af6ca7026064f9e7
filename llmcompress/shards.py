"""Reading the tensors of a safetensors directory (one file, or shards with an index) by name.

Each read opens its shard and closes it again: a memory map held open for a whole run would
keep every page it ever touched counted in the process's resident memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import LLMCompressError, ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ShardedWeights:
    """Where each tensor of a model directory lives, and reading tensors by name."""

    def __init__(self, directory: str | Path, error: type[LLMCompressError] = ModelError,
                 remedy: str = "re-download or re-save the model",
                 when_absent: str = "only safetensors models are read block by block (convert .bin weights with transformers' save_pretrained)") -> None:
        """``error`` is raised with ``remedy`` for a damaged directory, and with ``when_absent``
        when it holds no safetensors weights at all."""
        self.directory = Path(directory)
        self.error, self.remedy, self.when_absent = error, remedy, when_absent
        self.files = self._shard_files()
        self.location: dict[str, Path] = {}
        for file in self.files:
            for name in self._header_names(file):
                self.location[name] = file

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise self.error(f"{index} is corrupt ({err}): {self.remedy}") from err
            files = [self.directory / name for name in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise self.error(f"{index} lists shards that are missing: {', '.join(missing[:3])}: it is incomplete; {self.remedy}")
            return files
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        raise self.error(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: {self.when_absent}")

    def _header_names(self, file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise self.error(f"cannot read {file}: {err}; the file is truncated or corrupt: {self.remedy}") from err

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The named tensors, in their stored dtype, each shard opened once and closed again."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise self.error(f"cannot read {', '.join(file_names[:2])} from {file}: {err}; the file is truncated or corrupt: "
                                 f"{self.remedy}") from err
        return tensors

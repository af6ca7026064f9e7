"""Where the calibration activations between blocks live: on the compute device when they fit,
else on the host, else in files under an offload directory.

A block's inputs and its outputs are alive together, so two generations count. Hidden states
are handed out on the compute device one micro-batch at a time; the keywords of the block call
(masks, position tables) are shared by every block and stay on the device.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ConfigError

PLACES = ("auto", "device", "host", "disk")
KWARGS_FILE = "kwargs.pt"


class Activations(Sequence):
    """The micro-batches entering a block, as ``(hidden states, keywords)`` pairs."""

    def __init__(self, device: torch.device | str, place: str = "device", offload_dir: Path | None = None) -> None:
        if place not in PLACES[1:]:
            raise ConfigError(f"activations place {place!r} is not one of {', '.join(PLACES[1:])}")
        if place == "disk" and offload_dir is None:
            raise ConfigError("activations on disk need an offload directory: pass --offload-dir DIR")
        self.device = torch.device(device)
        self.place = place
        self.offload_dir = offload_dir
        self._hidden: list[Tensor | Path] = []
        self._kwargs: list[dict] = []
        self._files: Path | None = None
        if place == "disk":
            offload_dir.mkdir(parents=True, exist_ok=True)
            self._files = Path(tempfile.mkdtemp(prefix="activations-", dir=offload_dir))
            weakref.finalize(self, shutil.rmtree, self._files, True)  # a generation's files go with it

    def successor(self) -> Activations:
        """An empty store of the same kind, for the block's outputs."""
        return Activations(self.device, self.place, self.offload_dir)

    def move_to(self, device: torch.device) -> None:
        """Hand the micro-batches out on ``device`` from now on (the next block's, when blocks
        are spread over GPUs); stored on the old device, they move with it."""
        if device == self.device:
            return
        self.device = device
        self._kwargs = [_to(kwargs, device) for kwargs in self._kwargs]
        if self.place == "device":
            self._hidden = [hidden.to(device) for hidden in self._hidden]

    def append(self, hidden: Tensor, kwargs: dict) -> None:
        if self.place == "disk":
            file = self._files / f"{len(self._hidden):05d}.safetensors"
            save_file({"hidden": hidden.detach().to("cpu").contiguous()}, file)
            self._hidden.append(file)
        else:
            self._hidden.append(hidden.detach().to("cpu" if self.place == "host" else self.device))
        self._kwargs.append(kwargs)

    def __len__(self) -> int:
        return len(self._hidden)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        stored = self._hidden[index]
        hidden = load_file(stored)["hidden"] if isinstance(stored, Path) else stored
        return hidden.to(self.device), self._kwargs[index]

    @property
    def dtype(self) -> torch.dtype:
        stored = self._hidden[0]
        if isinstance(stored, Path):
            return load_file(stored)["hidden"].dtype
        return stored.dtype

    def save(self, directory: Path) -> None:
        """Write every micro-batch into ``directory`` (exactly, for a resume that changes no bit)."""
        for index in range(len(self)):
            hidden, _ = self[index]
            save_file({"hidden": hidden.to("cpu").contiguous()}, directory / f"{index:05d}.safetensors")
        torch.save([_to(kwargs, "cpu") for kwargs in self._kwargs], directory / KWARGS_FILE)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str, place: str, offload_dir: Path | None) -> Activations:
        # Our own file, written by the run being resumed: the keywords hold tuples and None.
        all_kwargs = torch.load(directory / KWARGS_FILE, weights_only=False)
        activations = cls(device, place, offload_dir)
        for index, kwargs in enumerate(all_kwargs):
            activations.append(load_file(directory / f"{index:05d}.safetensors")["hidden"], _to(kwargs, activations.device))
        return activations


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to(v, device) for key, v in value.items()}
    return value


def choose_place(place: str, nbytes: int, device: torch.device, offload_dir: Path | None) -> str:
    """``place`` unless "auto": the device when two generations fit in half its free memory,
    else the host under the same rule, else the offload directory (when there is one)."""
    if place != "auto":
        return place
    need = 2 * nbytes
    if device.type == "cuda" and need <= torch.cuda.mem_get_info(device)[0] // 2:
        return "device"
    if need <= _available_host_bytes() // 2:
        return "device" if device.type == "cpu" else "host"
    if offload_dir is not None:
        return "disk"
    return "device" if device.type == "cpu" else "host"


def _available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # no /proc (not Linux): assume it fits, as before this check existed

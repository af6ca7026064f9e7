"""Which device compresses each decoder block: one device for all, or, with ``"auto"``, the
visible GPUs in contiguous runs of blocks chosen by accelerate's device map.

The pipeline holds one block at a time, so the map is asked to balance the blocks' bytes over
the GPUs rather than to fit them all: each GPU's budget is its share of the blocks plus one
block of slack, capped by what is free on it. A block the map would leave on the host (a GPU
too small for its share) goes to the GPU with the most room instead, since one block at a time
fits wherever the calibration forward fits.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError

AUTO = "auto"
DEVICES = ("cpu", "cuda", AUTO)


def block_devices(blocks: nn.ModuleList, device: str | torch.device) -> list[torch.device]:
    """The device of each block: ``device`` for all, or the visible GPUs' spread for "auto"
    (the CPU when PyTorch sees no GPU)."""
    if str(device) != AUTO:
        return [torch.device(device)] * len(blocks)
    free = {index: torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())}
    if not free:
        return [torch.device("cpu")] * len(blocks)
    return spread_over_gpus(blocks, free)


def single_device(device: str) -> str:
    """The one device for work that does not go block by block (loading, evaluation): under
    "auto", the first GPU, or the CPU when there is none."""
    if device != AUTO:
        return device
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def spread_over_gpus(blocks: nn.ModuleList, free: dict[int, int]) -> list[torch.device]:
    """Contiguous runs of blocks over the GPUs of ``free`` (index -> free bytes), balanced by
    size with ``accelerate.infer_auto_device_map``. Works on meta-device blocks: only the
    tensors' shapes and dtypes are read."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    if not free:
        raise ConfigError("no GPU to spread the blocks over: use --device cpu")
    sizes = compute_module_sizes(blocks)
    block_bytes = [sizes[str(index)] for index in range(len(blocks))]
    share = math.ceil(sum(block_bytes) / len(free)) + max(block_bytes)
    budget = {index: min(share, room) for index, room in free.items()}
    budget["cpu"] = sum(block_bytes)  # a block the GPUs' budgets cannot take is placed below
    logger = logging.getLogger("accelerate.utils.modeling")
    quiet = logger.level
    logger.setLevel(logging.ERROR)  # it warns of GPU indices that do not exist, which a caller may pass on purpose
    try:
        device_map = infer_auto_device_map(blocks, max_memory=budget, no_split_module_classes=[type(blocks[0]).__name__])
    finally:
        logger.setLevel(quiet)
    roomiest = max(free, key=free.get)
    placed = []
    for index in range(len(blocks)):
        where = _lookup(device_map, str(index))
        placed.append(torch.device("cuda", where if isinstance(where, int) else roomiest))
    return placed


def _lookup(device_map: dict[str, int | str], name: str) -> int | str:
    """The device of module ``name`` in a map that may name it or one of its parents ("" is the root)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise KeyError("the device map places no module at the root")
        name = name.rpartition(".")[0]

"""The pipeline's ``BlockStore`` for a model on disk: blocks read from the model's safetensors
shards, compressed blocks committed to a ``RunDirectory``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .checkpoint import module_entries
from .pipeline import BlockInputs, LayerRecord
from .pipeline.activations import Activations
from .disknames import CheckpointNames, StoredNames
from .pipeline.sharded import materialize, release
from .shards import ShardedWeights
from .rundir import RunDirectory


class DiskStream:
    def __init__(self, weights: ShardedWeights, run: RunDirectory, blocks_path: str, model: nn.Module, names: CheckpointNames) -> None:
        self.weights = weights
        self.run = run
        self.blocks_path = blocks_path
        self.names = names
        self.stored = StoredNames(model)

    def _prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def first_block(self) -> int:
        return self.run.committed

    def resumed_inputs(self, device: torch.device, place: str, offload_dir: Path | None) -> BlockInputs:
        return Activations.load(self.run.resumed_inputs_dir(), device, place, offload_dir)

    def resumed_records(self) -> list[LayerRecord]:
        return [LayerRecord(**record) for record in self.run.committed_records()]

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        materialize(block, self._prefix(index), self.weights, device, self.names)

    def commit(self, index: int, block: nn.Module, records: list[LayerRecord], next_inputs: BlockInputs | None) -> None:
        prefix = self._prefix(index)
        tensors = {self.stored.tensor(f"{prefix}{name}"): tensor.detach().to("cpu").contiguous() for name, tensor in block.state_dict().items()}
        modules = {self.stored.module(name): entry for name, entry in module_entries(block, prefix).items()}
        self.run.commit_block(index, tensors, modules, [dataclasses.asdict(r) for r in records], next_inputs)
        release(block)


class LendingStream(DiskStream):
    """The store of a process that lends its share of the work to process 0, which writes the
    checkpoint (``llmcompress.distributed``): blocks are read as ``DiskStream`` reads them, and
    dropped once compressed."""

    def __init__(self, weights: ShardedWeights, blocks_path: str, model: nn.Module, names: CheckpointNames) -> None:
        super().__init__(weights, None, blocks_path, model, names)

    def first_block(self) -> int:
        return 0

    def resumed_records(self) -> list[LayerRecord]:
        return []

    def commit(self, index: int, block: nn.Module, records: list[LayerRecord], next_inputs: BlockInputs | None) -> None:
        release(block)

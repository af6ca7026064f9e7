"""The block-wise pipeline: the only code that walks a model (see ``driver`` for the data flow)."""

from .driver import CompressionReport, LayerRecord, compress_blocks
from .folding import Fold, apply_fold, find_fold
from .runner import BlockInputs, catch_block_inputs, gather_statistics, move_outside_blocks, run_block
from .structure import find_decoder_blocks, input_groups, plan_targets

__all__ = [
    "BlockInputs", "CompressionReport", "Fold", "LayerRecord", "apply_fold", "catch_block_inputs", "compress_blocks",
    "find_decoder_blocks", "find_fold", "gather_statistics", "input_groups", "move_outside_blocks", "plan_targets", "run_block",
]

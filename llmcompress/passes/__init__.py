"""Passes: each kind of compression step, registered by name (see ``base``). Importing this
package registers the built-in kinds; a new kind registers itself the same way, from anywhere."""

from . import lowrank, prune, quantize, rotate, smooth  # noqa: F401 - registers the built-in kinds
from .base import REGISTRY, Pass, PassConfig, pass_class, register
from .lowrank import LowRankPassConfig
from .prune import PrunePassConfig
from .quantize import QuantizePassConfig
from .rotate import RotatePassConfig
from .smooth import Smoothing, SmoothPassConfig
from .state import ColumnPrune, LayerState, Target, column_batches

__all__ = [
    "REGISTRY", "ColumnPrune", "LayerState", "LowRankPassConfig", "Pass", "PassConfig", "PrunePassConfig", "QuantizePassConfig", "RotatePassConfig",
    "SmoothPassConfig", "Smoothing", "Target", "column_batches", "pass_class", "register",
]

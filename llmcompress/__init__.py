"""llmcompress: post-training compression of causal language models."""

from . import evaluate
from .api import compress
from .checkpoint import load
from .config import AWQConfig, CalibConfig, CompressConfig, GPTQConfig, LowRankConfig, ModuleOverride, PruneConfig, QuantFormat
from .errors import CalibrationError, CheckpointError, ConfigError, LLMCompressError, ModelError
from .nn import CompressedLinear
from .passes import Pass, PassConfig, register
from .recipe import PassEntry, Recipe, load_recipe
from .version import __version__

__all__ = [
    "AWQConfig", "CalibConfig", "CalibrationError", "GPTQConfig", "CheckpointError", "CompressConfig", "CompressedLinear", "ConfigError",
    "LLMCompressError", "LowRankConfig", "ModelError", "ModuleOverride", "Pass", "PassConfig", "PassEntry", "PruneConfig", "QuantFormat",
    "Recipe", "__version__", "compress", "evaluate", "load", "load_recipe", "register",
]

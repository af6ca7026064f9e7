"""llmcompress: post-training compression of causal language models."""

__version__ = "0.1.0"

from . import evaluate  # noqa: E402  (after __version__, which checkpoint reads)
from .api import compress  # noqa: E402
from .checkpoint import load  # noqa: E402
from .config import AWQConfig, CalibConfig, CompressConfig, GPTQConfig, LowRankConfig, ModuleOverride, PruneConfig, QuantFormat  # noqa: E402
from .errors import CalibrationError, CheckpointError, ConfigError, LLMCompressError, ModelError  # noqa: E402
from .nn import CompressedLinear  # noqa: E402

__all__ = [
    "AWQConfig", "CalibConfig", "CalibrationError", "GPTQConfig", "CheckpointError", "CompressConfig", "CompressedLinear", "ConfigError",
    "LLMCompressError", "LowRankConfig", "ModelError", "ModuleOverride", "PruneConfig", "QuantFormat", "__version__", "compress", "evaluate", "load",
]

"""Exceptions that name the problem and the fix.

All of them derive from ``LLMCompressError`` so that the CLI can print the message alone,
without a traceback, while programming errors still surface as tracebacks.
"""


class LLMCompressError(Exception):
    """Base class of every error raised on bad input."""


class ConfigError(LLMCompressError, ValueError):
    """A configuration field has a value outside what is allowed."""


class ModelError(LLMCompressError):
    """A model cannot be found, read or mapped onto the block-wise pipeline."""


class CalibrationError(LLMCompressError):
    """Calibration or evaluation text is missing, unreadable or too short."""


class CheckpointError(LLMCompressError):
    """A checkpoint is missing, incomplete, corrupt, or cannot be written."""

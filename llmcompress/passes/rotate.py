"""The ``rotate`` pass: QuaRot's rotations, which spread outlier channels over all channels so
that weights and activations round with less error.

The residual stream is multiplied by one seeded random Hadamard matrix Q: the embeddings write
x Q, every layer reading a (norm-folded) residual takes W Q, every layer writing to it Q^T W, and
the head W Q, so the float model computes what it did. That part costs nothing at run time and
loads anywhere. Layers matching ``online`` (``down_proj``: its input, the MLP's product, carries
the worst outliers and no weight before it can absorb a rotation) also get a plain Hadamard H on
their input, applied by the compressed layer itself: W H on x H.

The pipeline applies the pass (``pipeline.rotation``) before anything else: the statistics, the
smoothing search and every layer pass then see the rotated model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import ConfigError
from ..hadamard import HadamardTransform, has_hadamard
from .base import Pass, register
from .options import PassConfig


@dataclasses.dataclass(frozen=True)
class RotatePassConfig(PassConfig):
    """``seed``: the random signs of the residual stream's Hadamard. ``online``: a pattern
    (``re.search`` on full module names) of the quantized layers whose input is rotated at run
    time (null: none). ``block_size``: block-diagonal Hadamards of this size (a power of two
    dividing the sizes) where a size has no full Hadamard, or to make every transform cheaper."""

    seed: int = 0
    online: str | None = "down_proj"
    block_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"rotate.seed={self.seed!r} is not allowed: an integer")
        if self.online is not None:
            if not isinstance(self.online, str) or not self.online:
                raise ConfigError(f"rotate.online={self.online!r} is not allowed: a pattern such as down_proj, or null for none")
            try:
                re.compile(self.online)
            except re.error as err:
                raise ConfigError(f"rotate.online={self.online!r} is not a valid regular expression ({err})") from err
        if self.block_size is not None:
            if (not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 2
                    or self.block_size & (self.block_size - 1)):
                raise ConfigError(f"rotate.block_size={self.block_size!r} is not allowed: a power of two such as 64 or 128, "
                                  "or null for full-size Hadamards")

    def label(self) -> str:
        return "rotate"

    def describe(self) -> str:
        online = f", online {self.online}" if self.online else ""
        block = f", blocks of {self.block_size}" if self.block_size else ""
        return f"Hadamard rotation (seed {self.seed}{online}{block})"

    def report_labels(self) -> dict[str, Any]:
        return {"method": "rotate"}


@register
class RotatePass(Pass):
    """A model pass: it rewrites the whole model once, before any block is calibrated."""

    kind = "rotate"
    config_class = RotatePassConfig
    phase = "model"

    def residual(self, config: RotatePassConfig, hidden_size: int) -> HadamardTransform:
        """The seeded random Hadamard Q of the residual stream."""
        return HadamardTransform(hidden_size, seed=config.seed, block_size=_block(config, hidden_size, "hidden size"))

    def online(self, config: RotatePassConfig, name: str, in_features: int) -> HadamardTransform | None:
        """The plain Hadamard applied at run time to this quantized layer's input, if any."""
        if config.online is None or re.search(config.online, name) is None:
            return None
        return HadamardTransform(in_features, block_size=_block(config, in_features, f"{name}'s input"))


def _block(config: RotatePassConfig, size: int, what: str) -> int | None:
    block = config.block_size
    if block is not None and block >= size:
        return None
    if block is None and not has_hadamard(size):
        raise ConfigError(f"rotate: no Hadamard matrix of order {size} (the {what}) is known to llmcompress: give rotate a "
                          "block_size, a power of two dividing it (e.g. 64), for block-diagonal Hadamards")
    return block

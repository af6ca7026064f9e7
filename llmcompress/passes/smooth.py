"""The ``smooth`` pass: a per-input-channel scale for each group of layers that read one input,
searched on the float block before any layer is compressed. AWQ's scale protects the channels
with large activations from rounding; SmoothQuant's moves activation outliers into the weight
so that both quantize (W8A8, W4A8); SVDQuant's smoothing moves activation outliers into the
weight, whose top singular directions the ``lowrank`` pass then splits off. The pipeline folds
the scale into the group's producer; SVDQuant's stays inside the layers where nothing takes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

from torch import Tensor

from ..config import QuantFormat
from ..errors import ConfigError
from ..methods.awq import search_scales
from ..methods.lowrank import hessian_error, sampled_error, search_smoothing
from ..methods.smoothquant import search_smoothquant
from ..stats import ABS_MAX, ABS_MEAN, HESSIAN, SAMPLES, GroupStats, LayerStats
from .base import Pass, register
from .options import PassConfig, check_choice, choices_of
from .state import Target

SmoothMethod = Literal["awq", "smoothquant", "svdquant"]


@dataclasses.dataclass(frozen=True)
class SmoothPassConfig(PassConfig):
    """``method``: awq (s = mean|x|^a, over mean|w|^(1-a) with ``duo_scaling``), smoothquant
    (s = max|x|^a / max|w|^(1-a), folded, the error measured with the activations quantized: it
    needs the quantize pass's act_bits) or svdquant (the same s, for its low-rank split);
    ``grid``: points on the exponent's grid."""

    method: SmoothMethod = "awq"
    grid: int = 20
    duo_scaling: bool | None = None

    def __post_init__(self) -> None:
        check_choice("smooth", "method", self.method, choices_of(SmoothMethod))
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
            raise ConfigError(f"smooth.grid={self.grid!r} is not allowed: a positive integer, typically 20")
        if self.method == "awq" and self.duo_scaling is None:
            object.__setattr__(self, "duo_scaling", True)
        if self.method != "awq" and self.duo_scaling is not None:
            raise ConfigError("smooth.duo_scaling is an AWQ option: leave it out under method svdquant")

    @property
    def keeps_unfoldable(self) -> bool:
        """SVDQuant's layers can compute on x / s themselves; AWQ's scale is only worth it folded."""
        return self.method == "svdquant"

    @property
    def needs_calibration(self) -> bool:
        return True

    def declare(self) -> dict[str, Any]:
        return {"smoothing": self.method}

    def requires(self) -> tuple[str, ...]:
        return ("fmt",)

    def label(self) -> str:
        return self.method

    def describe(self) -> str:
        return f"{self.method} smoothing"

    def report_labels(self) -> dict[str, Any]:
        # SVDQuant's smoothing is half of its branch, which the lowrank pass's labels name.
        return {"method": self.method} if self.method != "svdquant" else {}


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """A group's scale (None: leaving the input alone was best) and what it did to the error."""

    scales: Tensor | None
    alpha: float | None
    gain: float


@register
class SmoothPass(Pass):
    kind = "smooth"
    config_class = SmoothPassConfig
    phase = "block"

    def block_statistics(self, targets: Sequence[Target]) -> frozenset[str]:
        wanted = {HESSIAN}
        for target in targets:
            wanted |= {ABS_MEAN} if target.config(self.index).method == "awq" else {ABS_MAX}
            if target.config(self.index).method == "smoothquant" and target.act_format is None:
                raise ConfigError(f"smooth method smoothquant balances weights against quantized activations, but {target.name} "
                                  "keeps 16-bit activations: give the quantize pass act_bits (8 for W8A8), or use method awq")
            if target.config(self.index).method != "awq" and target.act_format is not None:
                wanted.add(SAMPLES)
        return frozenset(wanted)

    def search(self, weights: list[Tensor], targets: list[Target], config: SmoothPassConfig, stats: LayerStats | GroupStats) -> Smoothing:
        formats: list[QuantFormat] = [t.fmt for t in targets]
        if config.method == "awq":
            found = search_scales(weights, formats, stats.hessian, stats.act_abs_mean, grid=config.grid, duo_scaling=config.duo_scaling)
            return Smoothing(found.scales if found.alpha is not None else None, found.alpha, _gain(found.error, found.error_unscaled))
        act_format = targets[0].act_format
        if config.method == "smoothquant":
            found = search_smoothquant(weights, formats, act_format, stats.samples, stats.act_abs_max, grid=config.grid)
            return Smoothing(found.scales if found.alpha is not None else None, found.alpha, _gain(found.error, found.error_unscaled))
        if act_format is None:
            error = partial(hessian_error, hessian=stats.hessian)
        else:
            error = partial(sampled_error, samples=stats.samples, act_format=act_format)
        found = search_smoothing([w.detach().float() for w in weights], formats, [t.split_rank for t in targets],
                                 stats.act_abs_max, error, grid=config.grid)
        return Smoothing(found.smooth if found.alpha is not None else None, found.alpha, _gain(found.error, found.error_unsmoothed))


def _gain(error: float, before: float) -> float:
    return error / before if before > 0 else 1.0

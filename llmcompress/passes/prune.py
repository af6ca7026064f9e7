"""The ``prune`` pass: magnitude, Wanda or SparseGPT, unstructured or N:M. SparseGPT chooses its
mask inside the column loop of a later pass that runs one (GPTQ), quantizing in the same sweep;
without one it runs its own loop and prunes alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..config import PRUNE_METHODS, UNSTRUCTURED, PruneConfig, PruneMethod
from ..errors import ConfigError
from ..methods.gptq import gptq
from ..methods.prune import input_norms_from_hessian, magnitude_mask, wanda_mask
from ..stats import HESSIAN
from .base import Pass, register
from .options import PassConfig, check_choice
from .state import ColumnPrune, LayerState, column_batches


@dataclasses.dataclass(frozen=True)
class PrunePassConfig(PassConfig):
    """``method``: magnitude (smallest |w|), wanda (|w| x input norm) or sparsegpt (Hessian
    updates). ``pattern``: unstructured (each row loses ``floor(sparsity * in_features)``) or
    N:M along the inputs (stored compact); N:M fixes ``sparsity``. ``true_sequential``: the
    calibrated methods see the inputs the already-pruned layers before them produce. ``damp`` and
    ``block_size``: SparseGPT's loop when it runs alone."""

    method: PruneMethod = "magnitude"
    sparsity: float | None = None
    pattern: str = UNSTRUCTURED
    true_sequential: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        check_choice("prune", "method", self.method, PRUNE_METHODS)
        resolved = PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern)
        object.__setattr__(self, "sparsity", resolved.sparsity)
        if not 0 < self.damp <= 1:
            raise ConfigError(f"prune.damp={self.damp!r} is not allowed: a fraction in (0, 1], typically 0.01")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"prune.block_size={self.block_size!r} is not allowed: a positive integer, typically 128")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern).n_m

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def sequential(self) -> bool:
        return self.needs_calibration and self.true_sequential

    def statistics(self) -> frozenset[str]:
        return frozenset({HESSIAN}) if self.needs_calibration else frozenset()

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        n_m = self.n_m
        if n_m is not None and in_features % n_m[1]:
            raise ConfigError(f"pattern {self.pattern} groups every {n_m[1]} inputs, but {name} has {in_features} input features, "
                              f"not a multiple of {n_m[1]}: use another N:M, unstructured, or --skip this module")

    def label(self) -> str:
        return self.method

    def describe(self) -> str:
        return PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern).describe()

    def report_labels(self) -> dict[str, Any]:
        return {"pruning": self.describe()}

    def summary_note(self) -> str:
        """What the sparsity buys, honestly: only N:M is stored compact, and no kernel here skips zeros."""
        if self.n_m is None:
            return (f"sparsity: {self.sparsity:.0%} unstructured, stored dense (the zeros take as many bytes as any weight): "
                    "no size or speed gain from it")
        return (f"sparsity: {self.pattern}, stored compact (kept weights plus a 1-bit position mask); "
                "no speed gain: layers decompress to dense before the matmul")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.n_m is not None:
            data.pop("sparsity")  # the pattern fixes it
        return data


@register
class PrunePass(Pass):
    kind = "prune"
    config_class = PrunePassConfig

    def layers_independent(self, configs: Sequence[PrunePassConfig | None]) -> bool:
        return True

    def apply(self, layers: Sequence[tuple[LayerState, PrunePassConfig]]) -> None:
        alone = []
        for state, config in layers:
            state.methods.append(config.method)
            if config.n_m is not None:
                state.compact_pattern = config.pattern
            if config.method != "sparsegpt" or state.hessian is None:
                _fixed_mask(state, config)
            elif any(later.runs_column_loop for later in self.later_configs(state)):
                state.column_prune = ColumnPrune(config.sparsity, config.n_m)
            else:
                alone.append((state, config))
        for batch in column_batches(alone):
            _sparsegpt_alone(batch)


def _fixed_mask(state: LayerState, config: PrunePassConfig) -> None:
    """A mask chosen before any update: Wanda's where the layer saw calibration inputs, else by magnitude."""
    if config.method == "wanda" and state.hessian is not None:
        mask = wanda_mask(state.weight, input_norms_from_hessian(state.hessian), config.sparsity, config.n_m)
    else:
        if config.needs_calibration:
            state.note("no calibration input reached this layer: magnitude pruning")
        mask = magnitude_mask(state.weight, config.sparsity, config.n_m)
    state.weight = state.weight * mask
    state.mask = mask


def _sparsegpt_alone(batch: list[tuple[LayerState, PrunePassConfig]]) -> None:
    """SparseGPT without a quantizer's loop, in the input order of its paper; whatever quantizer
    follows sees the pruned weight."""
    states = [state for state, _ in batch]
    config = batch[0][1]
    sizes = [state.weight.shape[0] for state in states]
    result = gptq(torch.cat([s.weight for s in states]), states[0].hessian, None, damp=config.damp, block_size=config.block_size,
                  sparsity=config.sparsity, n_m=config.n_m)
    for state, weight, mask in zip(states, result.weight.split(sizes), result.mask.split(sizes), strict=True):
        state.weight, state.mask = weight, mask
        if result.damp > config.damp:
            state.note(f"damp raised to {result.damp:g}")

"""Per-layer activation statistics and the error measures built on them, as pure tensor code.

The pipeline feeds a ``LayerStats`` the inputs a Linear layer sees; it accumulates in float32
over micro-batches so that the result does not depend on how the tokens were batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

HESSIAN = "hessian"
ABS_MEAN = "abs_mean"
ABS_MAX = "abs_max"
SAMPLES = "samples"
ALL_STATISTICS = frozenset({HESSIAN, ABS_MEAN, ABS_MAX})
# Every 16th token is enough to measure an error that H cannot express (quantized
# activations), at 1/16 of the memory of keeping them all.
SAMPLE_EVERY = 16


@dataclass
class Contribution:
    """One micro-batch's share of a ``LayerStats``: its tokens and the statistics it adds."""

    tokens: int
    xtx: Tensor | None = None
    abs_sum: Tensor | None = None
    abs_max: Tensor | None = None
    sample: Tensor | None = None


@dataclass
class LayerStats:
    """Running statistics of a layer's inputs over tokens: X^T X, sum |x|, max |x| per channel."""

    in_features: int
    wanted: frozenset[str] = ALL_STATISTICS
    tokens: int = 0
    xtx: Tensor | None = field(default=None, repr=False)
    abs_sum: Tensor | None = field(default=None, repr=False)
    abs_max: Tensor | None = field(default=None, repr=False)
    sampled: list[Tensor] = field(default_factory=list, repr=False)

    def update(self, inputs: Tensor, token_weights: Tensor | None = None) -> None:
        """Add a micro-batch of inputs. ``token_weights`` (one per input row, an expert's router
        weights) scale each row's output, so each row's share of X^T X is weighted by its square."""
        self.add(self.contribution(inputs, token_weights))

    def contribution(self, inputs: Tensor, token_weights: Tensor | None = None) -> Contribution:
        """What a micro-batch of inputs adds, before it is added (``update`` is the two in a row)."""
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {x.shape[1]}")
        part = Contribution(tokens=x.shape[0])
        if HESSIAN in self.wanted:
            weighted = x if token_weights is None else x * token_weights.reshape(-1, 1).float()
            part.xtx = weighted.T @ weighted
        if ABS_MEAN in self.wanted or ABS_MAX in self.wanted:
            magnitude = x.abs()
            if ABS_MEAN in self.wanted:
                part.abs_sum = magnitude.sum(dim=0)
            if ABS_MAX in self.wanted:
                part.abs_max = magnitude.amax(dim=0)
        if SAMPLES in self.wanted:
            part.sample = x[::SAMPLE_EVERY].clone()
        return part

    def add(self, part: Contribution) -> None:
        """Add one micro-batch's contribution. The sums are sequential in micro-batch order, one
        product added at a time (not a fused addmm_, whose rounding depends on what it is fused
        with), so that processes that each computed some of the contributions reproduce a single
        process's bits by adding them in the same order (``llmcompress.distributed``)."""
        self.tokens += part.tokens
        if part.xtx is not None:
            self.xtx = part.xtx if self.xtx is None else self.xtx.add_(part.xtx)
        if part.abs_sum is not None:
            self.abs_sum = part.abs_sum if self.abs_sum is None else self.abs_sum + part.abs_sum
        if part.abs_max is not None:
            self.abs_max = part.abs_max if self.abs_max is None else torch.maximum(self.abs_max, part.abs_max)
        if part.sample is not None:
            self.sampled.append(part.sample)

    @property
    def hessian(self) -> Tensor:
        """The mean of x x^T over tokens, [K, K] float32."""
        self._require(self.xtx, HESSIAN)
        return self.xtx / self.tokens

    @property
    def act_abs_mean(self) -> Tensor:
        self._require(self.abs_sum, ABS_MEAN)
        return self.abs_sum / self.tokens

    @property
    def act_abs_max(self) -> Tensor:
        self._require(self.abs_max, ABS_MAX)
        return self.abs_max

    @property
    def samples(self) -> Tensor:
        """Every ``SAMPLE_EVERY``-th input token, [T, K] float32."""
        self._require(self.sampled or None, SAMPLES)
        return torch.cat(self.sampled)

    def _require(self, value: Tensor | None, name: str) -> None:
        if value is None:
            detail = "no inputs were seen" if self.tokens == 0 else f"'{name}' was not gathered"
            raise RuntimeError(f"statistic '{name}' is unavailable: {detail}")


class GroupStats:
    """The statistics of a group whose layers read different inputs (the experts of one module,
    each its routed tokens): each layer's own H, and the channel magnitudes over all their tokens."""

    def __init__(self, records: Sequence[LayerStats]) -> None:
        self.records = list(records)  # one per layer of the group, in its order
        self.distinct = list({id(r): r for r in self.records}.values())
        self.tokens = sum(r.tokens for r in self.distinct)

    @property
    def hessian(self) -> list[Tensor]:
        """Each layer's H, one tensor per record: an expert's gate and up share theirs."""
        computed = {id(record): record.hessian for record in self.distinct}
        return [computed[id(record)] for record in self.records]

    @property
    def act_abs_mean(self) -> Tensor:
        return sum(record.act_abs_mean * record.tokens for record in self.distinct) / self.tokens

    @property
    def act_abs_max(self) -> Tensor:
        return torch.stack([record.act_abs_max for record in self.distinct]).amax(dim=0)

    @property
    def samples(self) -> Tensor:
        return torch.cat([record.samples for record in self.distinct])


def weight_error(weight: Tensor, approx: Tensor) -> float:
    """Relative Frobenius error ||W - W'|| / ||W||."""
    reference = weight.float().norm()
    return float((weight.float() - approx.float()).norm() / reference) if reference > 0 else 0.0


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """Relative output error ||(W - W') X|| / ||W X|| over the calibration tokens, from H = mean x x^T."""
    weight, delta = weight.float(), weight.float() - approx.float()
    reference = ((weight @ hessian) * weight).sum()
    error = ((delta @ hessian) * delta).sum()
    return float((error.clamp(min=0) / reference).sqrt()) if reference > 0 else 0.0

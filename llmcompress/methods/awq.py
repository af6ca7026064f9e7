"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling, then a clipping search.

Pure functions. Both searches measure a layer's output error on the calibration tokens through
H = mean x x^T, with no activations kept: for a weight W and its approximation W',
error = tr((W - W') H (W - W')^T) = mean over tokens of ||(W - W') x||^2.

Scaling: layers that share an input x (q/k/v, or gate/up) are quantized as Q(W diag(s)) and
fed x / s, the 1/s folded into whatever produces x (a norm, or the rows of the linear before).
s = mean|x|^a, or with duo scaling mean|x|^a / mean|w|^(1-a) (|w| relative to its group's
max), normalised so that sqrt(max s * min s) = 1; a is searched on a grid in [0, 1), and s = 1
(plain RTN) is always a candidate, so the search never does worse than RTN on its objective.

Clipping: each group's range is shrunk by a ratio in [1 - max_shrink, 1], chosen per output row
and group to minimise that group's share of the output error (H's diagonal block for the group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import QuantFormat
from ..formats import decode, dequantize, encode, group_params, group_width, grouped, multipliers, nvfp4_global_scale, quantize


@dataclass(frozen=True)
class ScaleSearch:
    scales: Tensor
    alpha: float | None  # None: s = 1 (no scaling) won
    error: float
    error_unscaled: float


def output_error_sum(weights: list[Tensor], approximations: list[Tensor], hessian: Tensor | Sequence[Tensor]) -> float:
    """Sum over layers of mean ||(W - W') x||^2, from H = mean x x^T: one H for layers reading one
    input, or one per layer (experts, each on its own tokens)."""
    hessians = [hessian] * len(weights) if isinstance(hessian, Tensor) else list(hessian)
    total = 0.0
    for weight, approx, layer_hessian in zip(weights, approximations, hessians, strict=True):
        delta = weight.float() - approx.float()
        total += float(((delta @ layer_hessian) * delta).sum())
    return total


def _rtn_roundtrip(weight: Tensor, fmt: QuantFormat) -> Tensor:
    return dequantize(quantize(weight, fmt), fmt)


def weight_magnitude(weights: list[Tensor], fmt: QuantFormat) -> Tensor:
    """Mean over output rows of |w| relative to its group's max, per input channel [K]."""
    stacked = torch.cat([w.float() for w in weights], dim=0)
    groups = grouped(stacked.abs(), group_width(fmt, stacked.shape[1]))
    relative = groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return relative.reshape(stacked.shape[0], -1)[:, : stacked.shape[1]].mean(dim=0)


def candidate_scales(act_mean: Tensor, alpha: float, weight_mean: Tensor | None) -> Tensor:
    scales = act_mean.float().clamp(min=1e-8).pow(alpha)
    if weight_mean is not None:
        scales = scales / (weight_mean.float().pow(1 - alpha) + 1e-4)
    scales = scales.clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(weights: list[Tensor], formats: list[QuantFormat], hessian: Tensor | Sequence[Tensor], act_mean: Tensor,
                  grid: int = 20, duo_scaling: bool = True) -> ScaleSearch:
    """The per-input-channel scale s for layers sharing one input that minimises their output error."""
    weights = [w.detach().float() for w in weights]
    unscaled = output_error_sum(weights, [_rtn_roundtrip(w, f) for w, f in zip(weights, formats, strict=True)], hessian)
    best = ScaleSearch(scales=torch.ones_like(act_mean, dtype=torch.float32), alpha=None, error=unscaled, error_unscaled=unscaled)
    weight_mean = weight_magnitude(weights, formats[0]) if duo_scaling else None
    for step in range(grid):
        alpha = step / grid
        scales = candidate_scales(act_mean, alpha, weight_mean)
        approx = [_rtn_roundtrip(w * scales, f) / scales for w, f in zip(weights, formats, strict=True)]
        error = output_error_sum(weights, approx, hessian)
        if error < best.error:
            best = ScaleSearch(scales=scales, alpha=alpha, error=error, error_unscaled=unscaled)
    return best


def search_clipping(weight: Tensor, hessian: Tensor, fmt: QuantFormat, grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """The weight with each (row, group) range shrunk by the ratio that minimises that group's
    output error; quantizing it with RTN (or GPTQ) then uses the shrunk range."""
    weight = weight.float()
    rows, in_features = weight.shape
    width = group_width(fmt, in_features)
    groups = grouped(weight, width)
    count = groups.shape[1]
    padded = torch.nn.functional.pad(hessian.float(), (0, count * width - in_features, 0, count * width - in_features))
    blocks = torch.stack([padded[g * width:(g + 1) * width, g * width:(g + 1) * width] for g in range(count)])
    global_scale = nvfp4_global_scale(weight) if fmt.kind == "nvfp4" else None
    high, low = groups.amax(dim=-1, keepdim=True), groups.amin(dim=-1, keepdim=True)
    if fmt.symmetric:
        high = torch.maximum(high, -low)
        low = -high
    best_error = torch.full((rows, count), float("inf"), device=weight.device)
    best = groups.clone()
    for step in range(int(max_shrink * grid) + 1):
        ratio = 1 - step / grid
        clipped = torch.minimum(torch.maximum(groups, low * ratio), high * ratio)
        scales, zeros = group_params(clipped, fmt, global_scale)
        multiplier = multipliers(scales, fmt, global_scale).unsqueeze(-1)
        zero = None if zeros is None else zeros.unsqueeze(-1)
        delta = groups - decode(encode(clipped, multiplier, zero, fmt), multiplier, zero, fmt)
        error = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better.unsqueeze(-1), clipped, best)
    return best.reshape(rows, -1)[:, :in_features].contiguous()

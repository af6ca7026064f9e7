"""SmoothQuant: move activation outliers into the weights before both are quantized.

For layers sharing one input, s_j = max|x_j|^a / max|w_j|^(1-a) per input channel; the input is
divided by s (folded into its producer) and the weights' columns multiplied by it. The exponent
is chosen on calibration samples, with the activations quantized as the layers will run them
(the paper fixes a = 0.5; the best one varies by layer and format).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..actformat import ActFormat, fake_quantize_activations, static_scale
from ..config import QuantFormat
from ..formats import dequantize, quantize
from .awq import ScaleSearch


def smoothquant_scales(act_abs_max: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """s = max|x|^a / max|w|^(1-a) per input channel, over every layer of the group, normalised
    to a geometric mean of one (the products are unchanged by the normalisation)."""
    weight_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    scales = act_abs_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    scales = scales.clamp(min=1e-5)
    return scales / scales.log().mean().exp()


def quantized_output_error(weights: Sequence[Tensor], formats: Sequence[QuantFormat], act_format: ActFormat, samples: Tensor,
                           scales: Tensor | None) -> float:
    """sum over the group of ||x W^T - q_a(x / s) Q(W diag(s))^T||^2 on calibration samples [T, K]."""
    x = samples.float()
    smoothed = x if scales is None else x / scales
    act_scale = static_scale(smoothed.abs().amax(), act_format) if act_format.static else None
    quantized_x = fake_quantize_activations(smoothed, act_format, act_scale)
    total = 0.0
    for weight, fmt in zip(weights, formats, strict=True):
        w = weight.detach().float()
        scaled = w if scales is None else w * scales
        total += float((x @ w.T - quantized_x @ dequantize(quantize(scaled, fmt), fmt).T).square().sum())
    return total


def search_smoothquant(weights: Sequence[Tensor], formats: Sequence[QuantFormat], act_format: ActFormat, samples: Tensor,
                       act_abs_max: Tensor, grid: int = 20) -> ScaleSearch:
    """The exponent a in [0, 1) on a grid (or no smoothing) with the least quantized output error."""
    unscaled = quantized_output_error(weights, formats, act_format, samples, None)
    best = ScaleSearch(scales=torch.ones_like(act_abs_max, dtype=torch.float32), alpha=None, error=unscaled, error_unscaled=unscaled)
    for step in range(grid):
        alpha = step / grid
        scales = smoothquant_scales(act_abs_max, weights, alpha)
        error = quantized_output_error(weights, formats, act_format, samples, scales)
        if error < best.error:
            best = ScaleSearch(scales=scales, alpha=alpha, error=error, error_unscaled=unscaled)
    return best

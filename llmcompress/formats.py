"""Number formats as pure tensor functions: quantize a weight to codes + scales, and back.

Canonical layout, shared by every method, the checkpoint and the kernels:

- ``codes``: uint8 [N, K], one unpacked code per weight.
  INT: unsigned codes in [0, 2^b - 1], value = (code - zero) * scale; symmetric formats have the
  implicit zero 2^(b-1). FP4: E2M1 sign-magnitude nibbles (bit 3 = sign, bits 0-2 = magnitude
  index into 0, 0.5, 1, 1.5, 2, 3, 4, 6).
- ``scales``: [N, ceil(K / group)]: float16 (INT), float8_e4m3fn (NVFP4, relative to the global
  scale), uint8 E8M0 biased exponents (MXFP4, scale = 2^(e - 127)).
- ``zeros``: uint8 [N, ceil(K / group)] for asymmetric INT, else None.
- ``global_scale``: float32 [1] for NVFP4 (``448 * 6 / amax``; dequantize with scale / global).

When K is not a multiple of the group, the last group is ragged: it covers the remaining
columns only. Padding uses zeros, which every format represents exactly and which never widens
a range (asymmetric ranges always include zero), so the padding changes no parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import PER_CHANNEL, QuantFormat

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
E8M0_BIAS = 127
# E2M1's largest exponent: MXFP4's shared exponent is floor(log2(amax)) - 2 (OCP MX spec).
E2M1_EMAX = 2
# Scales are stored in float16; clamping keeps an all-zero group finite (its codes all equal
# the zero point, so any positive scale reproduces it exactly).
FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix in the canonical unpacked layout described in the module docstring."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None = None
    global_scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def group_width(fmt: QuantFormat, in_features: int) -> int:
    return in_features if fmt.group_size == PER_CHANNEL else fmt.group_size


def num_groups(fmt: QuantFormat, in_features: int) -> int:
    width = group_width(fmt, in_features)
    return -(-in_features // width)


def _grouped(weight: Tensor, width: int) -> Tensor:
    """[N, K] -> [N, G, width], zero-padding the ragged last group."""
    rows, cols = weight.shape
    groups = -(-cols // width)
    pad = groups * width - cols
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(rows, groups, width)


def expand_groups(per_group: Tensor, width: int, in_features: int) -> Tensor:
    """[N, G] -> [N, K]: repeat each group's value over its columns."""
    return per_group.repeat_interleave(width, dim=1)[:, :in_features]


# ----------------------------------------------------------------------------- integer


def int_qparams(weight: Tensor, fmt: QuantFormat) -> tuple[Tensor, Tensor | None]:
    """Scales (float16 [N, G]) and zero points (uint8 [N, G] or None) of an INT format.

    Symmetric: scale = amax / ((2^b - 1) / 2), codes in [-2^(b-1), 2^(b-1) - 1] around 2^(b-1):
    this uses all 2^b levels and its largest error is still half a step.
    Asymmetric: the range [min(w, 0), max(w, 0)] over 2^b - 1 steps, zero = round(-min / scale).
    """
    width = group_width(fmt, weight.shape[1])
    grouped = _grouped(weight.float(), width)
    levels = 2**fmt.bits - 1
    if fmt.symmetric:
        amax = grouped.abs().amax(dim=-1)
        return _half_rounded_up(amax / (levels / 2)), None
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    scales = _half_rounded_up((high - low) / levels)
    zeros = torch.round(-low / scales.float()).clamp(0, levels).to(torch.uint8)
    return scales, zeros


def _half_rounded_up(scales: Tensor) -> Tensor:
    """Cast scales to float16 rounding up, so the group's extremes never fall outside the code range."""
    clamped = scales.clamp(FP16_MIN_SUBNORMAL, FP16_MAX)
    half = clamped.half()
    larger = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < clamped, larger, half)


def int_codes(weight: Tensor, scales: Tensor, zeros: Tensor | None, fmt: QuantFormat) -> Tensor:
    """Round a weight to INT codes under given per-group parameters (GPTQ calls this per column)."""
    in_features = weight.shape[1]
    width = group_width(fmt, in_features)
    levels = 2**fmt.bits - 1
    scale = expand_groups(scales.float(), width, in_features)
    zero = _zero_points(zeros, fmt, width, in_features)
    return torch.round(weight.float() / scale + zero).clamp(0, levels).to(torch.uint8)


def int_dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | None, fmt: QuantFormat, dtype: torch.dtype) -> Tensor:
    in_features = codes.shape[1]
    width = group_width(fmt, in_features)
    scale = expand_groups(scales.float(), width, in_features)
    zero = _zero_points(zeros, fmt, width, in_features)
    return ((codes.float() - zero) * scale).to(dtype)


def _zero_points(zeros: Tensor | None, fmt: QuantFormat, width: int, in_features: int) -> Tensor | float:
    if zeros is None:
        return float(2 ** (fmt.bits - 1))
    return expand_groups(zeros.float(), width, in_features)


# ----------------------------------------------------------------------------- FP4 E2M1

_E2M1 = torch.tensor(E2M1_VALUES)
_E2M1_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2


def e2m1_encode(values: Tensor) -> Tensor:
    """Round float values (already divided by their scale) to E2M1 nibbles, ties to even."""
    magnitude = values.float().abs().clamp(max=FP4_MAX)
    index = torch.bucketize(magnitude, _E2M1_MIDPOINTS, right=False)
    # bucketize sends a tie to the lower code; round-half-to-even wants the even mantissa.
    at_tie = magnitude == _E2M1_MIDPOINTS[index.clamp(max=len(_E2M1_MIDPOINTS) - 1)]
    index = torch.where(at_tie & (index % 2 == 1), index + 1, index)
    negative = (values < 0) & (index > 0)
    return (index | (negative.to(index.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: Tensor) -> Tensor:
    magnitude = _E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def nvfp4_quantize(weight: Tensor) -> QuantizedWeight:
    """NVFP4: groups of 16, E4M3 scales relative to an FP32 global scale (compressed-tensors rule)."""
    grouped = _grouped(weight.float(), 16)
    amax = weight.float().abs().amax()
    global_scale = torch.where(amax > 0, FP8_E4M3_MAX * FP4_MAX / amax, torch.ones_like(amax)).reshape(1)
    block_scale = grouped.abs().amax(dim=-1) / FP4_MAX * global_scale
    scales = block_scale.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    codes = _fp4_codes(grouped, scales.float() / global_scale, weight.shape[1])
    return QuantizedWeight(codes=codes, scales=scales, global_scale=global_scale.float())


def mxfp4_quantize(weight: Tensor) -> QuantizedWeight:
    """MXFP4: groups of 32 sharing a power-of-two scale 2^(floor(log2 amax) - 2) (OCP MX v1.0)."""
    grouped = _grouped(weight.float(), 32)
    amax = grouped.abs().amax(dim=-1)
    exponent = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))) - E2M1_EMAX
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    biased = (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    codes = _fp4_codes(grouped, _e8m0_to_float(biased), weight.shape[1])
    return QuantizedWeight(codes=codes, scales=biased)


def _fp4_codes(grouped: Tensor, scale: Tensor, in_features: int) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = e2m1_encode(grouped / safe.unsqueeze(-1))
    codes = torch.where((scale > 0).unsqueeze(-1), codes, torch.zeros_like(codes))
    return codes.reshape(grouped.shape[0], -1)[:, :in_features].contiguous()


def _e8m0_to_float(biased: Tensor) -> Tensor:
    return torch.exp2(biased.float() - E8M0_BIAS)


def fp4_group_scales(q: QuantizedWeight, fmt: QuantFormat) -> Tensor:
    """Per-group float32 multipliers of an FP4 weight: what each decoded E2M1 value is scaled by."""
    if fmt.kind == "nvfp4":
        return q.scales.float() / q.global_scale.float()
    return _e8m0_to_float(q.scales)


# ----------------------------------------------------------------------------- dispatch


def quantize(weight: Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight in the given format."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    if fmt.kind == "nvfp4":
        return nvfp4_quantize(weight)
    if fmt.kind == "mxfp4":
        return mxfp4_quantize(weight)
    scales, zeros = int_qparams(weight, fmt)
    return QuantizedWeight(codes=int_codes(weight, scales, zeros, fmt), scales=scales, zeros=zeros)


def dequantize(q: QuantizedWeight, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight that the codes and scales represent."""
    if fmt.is_fp4:
        in_features = q.codes.shape[1]
        scale = expand_groups(fp4_group_scales(q, fmt), fmt.group_size, in_features)
        return (e2m1_decode(q.codes) * scale).to(dtype)
    return int_dequantize(q.codes, q.scales, q.zeros, fmt, dtype)

"""Number formats as pure tensor functions: quantize a weight to codes + scales, and back.

Canonical layout, shared by every method, the checkpoint and the kernels:

- ``codes``: uint8 [N, K], one unpacked code per weight.
  INT: unsigned codes in [0, 2^b - 1], value = (code - zero) * scale; symmetric formats have the
  implicit zero 2^(b-1). FP4: E2M1 sign-magnitude nibbles (bit 3 = sign, bits 0-2 = magnitude
  index into 0, 0.5, 1, 1.5, 2, 3, 4, 6).
- ``scales``: [N, G]: float16 (INT), float8_e4m3fn (NVFP4, relative to the global scale),
  uint8 E8M0 biased exponents (MXFP4, scale = 2^(e - 127)).
- ``zeros``: uint8 [N, G] for asymmetric INT, else None.
- ``global_scale``: float32 [1] for NVFP4 (``448 * 6 / amax``; dequantize with scale / global).
- ``g_idx``: int32 [K] or None: the group of each input column. None means contiguous groups
  (column j is in group j // group_size); GPTQ's act-order records its own assignment here.

G = ceil(K / group_size). The pipeline gives every layer a group that divides its inputs
(``dividing_group``), since no serving format holds anything else; a checkpoint written before
that may still hold a ragged last group, which covers the remaining columns only. Padding uses
zeros, which every format represents exactly and which never widens a range (asymmetric ranges
always include zero).

The group-level functions (``group_params``, ``multipliers``, ``encode``, ``decode``) work on
any [N, G, W] slice, so that GPTQ can quantize one column at a time with the same arithmetic
that round-to-nearest applies to the whole matrix.
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
    g_idx: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


# vLLM's Marlin kernels (its fastest INT4/INT8 path on GPUs) take these groups only; its other
# kernels take any group that divides the layer's inputs.
KERNEL_GROUPS = (32, 64, 128)
# QuantFormat's rule for an INT group (bit-packed groups of whole bytes at every width).
GROUP_MULTIPLE = 8


def dividing_group(in_features: int, requested: int) -> int:
    """The group for a layer of ``in_features`` inputs when ``requested`` does not divide them:
    the largest divisor not above the request (a multiple of 8), and where the request is a group
    every vLLM kernel takes, the largest such group that divides (576 inputs at g128 -> 64, where
    96 would divide too but leave Marlin out); one scale per channel where nothing divides."""
    divisors = [g for g in range(GROUP_MULTIPLE, min(requested, in_features) + 1, GROUP_MULTIPLE) if in_features % g == 0]
    if requested in KERNEL_GROUPS:
        divisors = [g for g in divisors if g in KERNEL_GROUPS] or divisors
    return max(divisors) if divisors else PER_CHANNEL


def group_width(fmt: QuantFormat, in_features: int) -> int:
    return in_features if fmt.group_size == PER_CHANNEL else fmt.group_size


def num_groups(fmt: QuantFormat, in_features: int) -> int:
    return -(-in_features // group_width(fmt, in_features))


def grouped(weight: Tensor, width: int) -> Tensor:
    """[N, K] -> [N, G, width] in float32, zero-padding the ragged last group."""
    rows, cols = weight.shape
    groups = -(-cols // width)
    padded = torch.nn.functional.pad(weight.float(), (0, groups * width - cols))
    return padded.reshape(rows, groups, width)


def column_groups(q: QuantizedWeight, fmt: QuantFormat) -> Tensor:
    """The group index of every input column, [K] long."""
    return group_index(q.g_idx, fmt, q.codes.shape[1], q.codes.device)


def group_index(g_idx: Tensor | None, fmt: QuantFormat, in_features: int, device: torch.device) -> Tensor:
    """The group of each of ``in_features`` columns, [K] long: ``g_idx`` where act-order set it, else contiguous."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_features, device=device) // group_width(fmt, in_features)


def implicit_zero(fmt: QuantFormat) -> int:
    """The code of 0 in a symmetric INT format."""
    return 2 ** (fmt.bits - 1)


def nvfp4_global_scale(weight: Tensor) -> Tensor:
    """NVFP4's per-tensor scale, 448 * 6 / amax (compressed-tensors' rule), float32 [1]."""
    amax = weight.float().abs().amax()
    return torch.where(amax > 0, FP8_E4M3_MAX * FP4_MAX / amax, torch.ones_like(amax)).reshape(1)


def split_rows(q: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a quantized matrix into row blocks of the given sizes. Per-row data is split; the
    per-tensor global scale and the per-column g_idx are copied, so that each layer owns its
    tensors (a shared one would look like a tied weight to the checkpoint)."""
    codes, scales = q.codes.split(sizes), q.scales.split(sizes)
    zeros = q.zeros.split(sizes) if q.zeros is not None else [None] * len(sizes)
    return [QuantizedWeight(codes=c.contiguous(), scales=s.contiguous(), zeros=None if z is None else z.contiguous(),
                            global_scale=None if q.global_scale is None else q.global_scale.clone(),
                            g_idx=None if q.g_idx is None else q.g_idx.clone())
            for c, s, z in zip(codes, scales, zeros, strict=True)]


# ----------------------------------------------------------------------------- group level


def group_params(groups: Tensor, fmt: QuantFormat, global_scale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Stored scales [N, G] and zero points (uint8 [N, G] or None) of weights grouped [N, G, W].

    INT symmetric: scale = amax / ((2^b - 1) / 2), codes [-2^(b-1), 2^(b-1) - 1] around 2^(b-1):
    all 2^b levels are used and the largest error is still half a step.
    INT asymmetric: the range [min(w, 0), max(w, 0)] over 2^b - 1 steps, zero = round(-min / scale).
    NVFP4: E4M3 block scale amax / 6 * global. MXFP4: exponent floor(log2(amax)) - 2 (OCP MX v1.0).
    """
    groups = groups.float()
    if fmt.kind == "nvfp4":
        block = groups.abs().amax(dim=-1) / FP4_MAX * global_scale
        return block.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn), None
    if fmt.kind == "mxfp4":
        amax = groups.abs().amax(dim=-1)
        exponent = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))) - E2M1_EMAX
        exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
        return (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8), None
    levels = 2**fmt.bits - 1
    if fmt.symmetric:
        return _half_rounded_up(groups.abs().amax(dim=-1) / (levels / 2)), None
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scales = _half_rounded_up((high - low) / levels)
    zeros = torch.round(-low / scales.float()).clamp(0, levels).to(torch.uint8)
    return scales, zeros


def _half_rounded_up(scales: Tensor) -> Tensor:
    """Cast scales to float16 rounding up, so the group's extremes never fall outside the code range."""
    clamped = scales.clamp(FP16_MIN_SUBNORMAL, FP16_MAX)
    half = clamped.half()
    larger = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < clamped, larger, half)


def multipliers(scales: Tensor, fmt: QuantFormat, global_scale: Tensor | None = None) -> Tensor:
    """What each decoded code is multiplied by, float32, same shape as ``scales``."""
    if fmt.kind == "nvfp4":
        return scales.float() / global_scale.float()
    if fmt.kind == "mxfp4":
        return torch.exp2(scales.float() - E8M0_BIAS)
    return scales.float()


def encode(values: Tensor, multiplier: Tensor, zeros: Tensor | None, fmt: QuantFormat) -> Tensor:
    """Round values to codes under broadcastable per-group multipliers (and zero points)."""
    if fmt.is_fp4:
        safe = torch.where(multiplier > 0, multiplier, torch.ones_like(multiplier))
        codes = e2m1_encode(values.float() / safe)
        return torch.where(multiplier > 0, codes, torch.zeros_like(codes))
    zero = float(implicit_zero(fmt)) if zeros is None else zeros.float()
    return torch.round(values.float() / multiplier + zero).clamp(0, 2**fmt.bits - 1).to(torch.uint8)


def decode(codes: Tensor, multiplier: Tensor, zeros: Tensor | None, fmt: QuantFormat) -> Tensor:
    """The float32 values that codes represent; the inverse of ``encode`` on the grid."""
    if fmt.is_fp4:
        return e2m1_decode(codes) * multiplier
    zero = float(implicit_zero(fmt)) if zeros is None else zeros.float()
    return (codes.float() - zero) * multiplier


# ----------------------------------------------------------------------------- FP4 E2M1

_E2M1 = torch.tensor(E2M1_VALUES)
_E2M1_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2


def e2m1_encode(values: Tensor) -> Tensor:
    """Round float values (already divided by their scale) to E2M1 nibbles, ties to even."""
    midpoints = _E2M1_MIDPOINTS.to(values.device)
    magnitude = values.float().abs().clamp(max=FP4_MAX)
    index = torch.bucketize(magnitude, midpoints, right=False)
    # bucketize sends a tie to the lower code; round-half-to-even wants the even mantissa.
    at_tie = magnitude == midpoints[index.clamp(max=len(midpoints) - 1)]
    index = torch.where(at_tie & (index % 2 == 1), index + 1, index)
    negative = (values < 0) & (index > 0)
    return (index | (negative.to(index.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: Tensor) -> Tensor:
    magnitude = _E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


# ----------------------------------------------------------------------------- whole matrix


def quantize(weight: Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight in the given format."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    rows, in_features = weight.shape
    groups = grouped(weight, group_width(fmt, in_features))
    global_scale = nvfp4_global_scale(weight) if fmt.kind == "nvfp4" else None
    scales, zeros = group_params(groups, fmt, global_scale)
    codes = encode(groups, multipliers(scales, fmt, global_scale).unsqueeze(-1), None if zeros is None else zeros.unsqueeze(-1), fmt)
    codes = codes.reshape(rows, -1)[:, :in_features].contiguous()
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, global_scale=global_scale)


def dequantize(q: QuantizedWeight, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight that the codes and scales represent."""
    columns = column_groups(q, fmt)
    multiplier = multipliers(q.scales, fmt, q.global_scale)[:, columns]
    zeros = None if q.zeros is None else q.zeros[:, columns]
    return decode(q.codes, multiplier, zeros, fmt).to(dtype)


def fake_quantize(values: Tensor, fmt: QuantFormat) -> Tensor:
    """``values`` [..., K] rounded to ``fmt`` row by row along the last dimension (per token, for
    activations) and returned in their own dtype: what a low-bit activation path computes with."""
    flat = values.reshape(-1, values.shape[-1]).float()
    return dequantize(quantize(flat, fmt), fmt).reshape(values.shape).to(values.dtype)

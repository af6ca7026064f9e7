"""Activation number formats that serving engines run: W8A8 INT8, W8A8 / W4A8 FP8 and W4A4.

Activations are [..., K] with K the features; every scale covers one token (a row), a group of
features within a token, or, for static formats, the whole tensor (calibrated, stored with the
layer). Codes are int8 (INT, in [-qmax - 1, qmax]) or float8 (FP8); scales are float32.

Two INT arithmetics coexist. Per-token and static INT follow vLLM's dynamic W8A8 convention,
scale = amax / qmax. Grouped INT without power-of-two scales is the weight formats' symmetric INT
(``formats.group_params``: amax / (qmax + 1/2) in float16 rounded up, all 2^b codes), because the
W4A4 checkpoints written before this module store ``asdict(QuantFormat(...))`` and must keep their
numbers bit for bit. That half-step grid is not a fixed point of quantize(dequantize(.)): the
extreme lands on qmax or -qmax - 1, from which a different scale is derived.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .config import FP4_GROUP_SIZE, QuantFormat, _fail
from .formats import FP4_MAX, encode, fake_quantize, group_params, grouped, implicit_zero

ActKind = Literal["int", "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4"]
ACT_KINDS: tuple[str, ...] = typing.get_args(ActKind)
# The same -1 as the weights' PER_CHANNEL: one scale per row of the [tokens, features] input.
PER_TOKEN = -1
_BITS = {"int": (4, 8), "fp8_e4m3": (8,), "fp8_e5m2": (8,), "nvfp4": (4,), "mxfp4": (4,)}
# Codes dtype, and half the step below the largest finite value (see ``_pow2_limit``).
_FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 16.0), "fp8_e5m2": (torch.float8_e5m2, 4096.0)}


@dataclass(frozen=True)
class ActFormat:
    """How a layer's input is quantized on the way into its low-bit matmul.

    ``group_size`` -1 is one scale per token; FP4 kinds fix 16 (nvfp4) / 32 (mxfp4). ``static``
    is compressed-tensors' "tensor" strategy with dynamic=false: one calibrated scale per tensor.
    ``pow2_scales`` (ZeroQuant-FP) rounds scales up to powers of two; nvfp4's are E4M3 and mxfp4's
    are powers of two already, so both refuse it rather than have two spellings of one format.
    """

    kind: ActKind = "int"
    bits: int = 8
    group_size: int = PER_TOKEN
    symmetric: bool = True
    static: bool = False
    pow2_scales: bool = False

    def __post_init__(self) -> None:
        owner = "ActFormat"
        if self.kind not in ACT_KINDS:
            _fail(owner, "kind", self.kind, f"one of {', '.join(ACT_KINDS)}")
        allowed_bits = _BITS[self.kind]
        if isinstance(self.bits, bool) or self.bits not in allowed_bits:
            _fail(owner, "bits", self.bits, f"{self.kind} takes bits={' or '.join(map(str, allowed_bits))}")
        if self.is_fp4:
            if self.group_size != FP4_GROUP_SIZE[self.kind]:
                _fail(owner, "group_size", self.group_size, f"{self.kind} fixes group_size={FP4_GROUP_SIZE[self.kind]}")
        elif (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
              or not (self.group_size == PER_TOKEN or (self.group_size >= 8 and self.group_size % 8 == 0))):
            _fail(owner, "group_size", self.group_size, "-1 (one scale per token) or a positive multiple of 8 (features per scale)")
        if self.symmetric is not True:
            _fail(owner, "symmetric", self.symmetric, "True; asymmetric activations are not supported")
        for name in ("static", "pow2_scales"):
            if not isinstance(getattr(self, name), bool):
                _fail(owner, name, getattr(self, name), "True or False")
        if self.static and self.group_size != PER_TOKEN:
            _fail(owner, "static", self.static, f"a static scale covers the whole tensor, so it needs group_size=-1, "
                  f"not {self.group_size} (FP4 kinds fix their groups and have no static form)")
        if self.pow2_scales and self.kind == "nvfp4":
            _fail(owner, "pow2_scales", self.pow2_scales, "False for nvfp4, whose block scales are E4M3")
        if self.pow2_scales and self.kind == "mxfp4":
            _fail(owner, "pow2_scales", self.pow2_scales, "False for mxfp4, whose E8M0 scales are powers of two already")

    @classmethod
    def from_quant_format(cls, fmt: QuantFormat) -> ActFormat:
        """The activation format of an old checkpoint's (or the FP4 weights') QuantFormat, same numbers."""
        return cls(kind=fmt.kind, bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric)

    @property
    def is_fp4(self) -> bool:
        return self.kind in FP4_GROUP_SIZE

    @property
    def qmax(self) -> float:
        """The largest code magnitude a scale maps amax to (E2M1's 6 for the FP4 kinds)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        return torch.finfo(_FP8[self.kind][0]).max if self.kind in _FP8 else FP4_MAX

    def describe(self) -> str:
        if self.is_fp4:
            label = self.kind.upper()
        else:
            name = f"INT{self.bits}" if self.kind == "int" else self.kind.upper().replace("_", "-")
            grain = "static per-tensor" if self.static else "per-token" if self.group_size == PER_TOKEN else f"g{self.group_size}"
            label = f"{name} {grain}"
        return label + (" + pow2 scales" if self.pow2_scales else "")


def _weight_format(fmt: ActFormat) -> QuantFormat:
    return QuantFormat(kind=fmt.kind, bits=fmt.bits, group_size=fmt.group_size, symmetric=True)


def _uses_weight_int(fmt: ActFormat) -> bool:
    """Grouped INT as the weight formats compute it (see the module docstring)."""
    return fmt.kind == "int" and fmt.group_size != PER_TOKEN and not fmt.pow2_scales


def _pow2_ceil(values: Tensor) -> Tensor:
    """Non-negative float32 values rounded up to powers of two. On the bit pattern this is an
    integer add and mask whose carry moves into the exponent, so it is exact where log2 / exp2 may
    be off by an ulp; zero stays zero."""
    mantissa = (1 << 23) - 1
    return ((values.float().contiguous().view(torch.int32) + mantissa) & ~mantissa).view(torch.float32)


def _pow2_limit(fmt: ActFormat) -> float:
    """What amax / scale may reach with power-of-two scales. INT: qmax; the top code is then at
    least (qmax + 1) / 2, so a dequantized row finds the same scale again. FP8 rounds amax / scale
    just above qmax / 2 down to qmax / 2 (E4M3: 225 -> 224), which would pick half the scale, so
    amax may reach half a step above qmax (E4M3: 464), where it saturates with no more error than
    rounding; the top code is then at least 240 (E5M2: 32768), above qmax / 2."""
    return fmt.qmax + (_FP8[fmt.kind][1] if fmt.kind in _FP8 else 0.0)


def _scales(amax: Tensor, fmt: ActFormat) -> Tensor:
    """float32 scales from abs-maxima; an all-zero (or underflowing) one gets 1, which any code
    reproduces. Plain amax / qmax is a fixed point of quantize(dequantize(.)): with s = amax / qmax
    rounded, (qmax * s rounded) / qmax rounds back to s (checked for these qmax on every float32
    significand), so no extra rounding of the scale is needed."""
    scale = _pow2_ceil(amax / _pow2_limit(fmt)) if fmt.pow2_scales else amax / fmt.qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _encode(values: Tensor, fmt: ActFormat) -> Tensor:
    """Codes of values already divided by their scale. FP8 clamps first: E5M2 overflows to inf, and
    older torch releases cast E4M3FN overflow (480 and up) to NaN, where torch 2.13 saturates."""
    if fmt.kind == "int":
        return torch.round(values).clamp(-fmt.qmax - 1, fmt.qmax).to(torch.int8)
    return values.clamp(-fmt.qmax, fmt.qmax).to(_FP8[fmt.kind][0])


def _check_call(fmt: ActFormat, scale: Tensor | None) -> None:
    if fmt.is_fp4:
        raise ValueError(f"{fmt.describe()} codes need the weight format's scale layout (NVFP4's global scale): "
                         "use formats.quantize / dequantize, or fake_quantize_activations")
    if fmt.static != (scale is not None):
        raise ValueError(f"{fmt.describe()} " + ("needs its calibrated per-tensor scale (static_scale)" if fmt.static
                                                 else "finds its scales in x; pass no scale"))


def static_scale(amax: Tensor, fmt: ActFormat) -> Tensor:
    """A static format's per-tensor scale, float32 [1], from the abs-max seen on calibration data:
    the scale a dynamic per-tensor quantization of that data would use."""
    if not fmt.static:
        raise ValueError(f"{fmt.describe()} is dynamic: only a static ActFormat stores a per-tensor scale")
    return _scales(amax.float().amax().reshape(1), fmt)


def quantize_activations(x: Tensor, fmt: ActFormat, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Codes [..., K] (int8 or float8) and float32 scales of ``x`` [..., K]: [..., 1] per token,
    [..., ceil(K / group_size)] grouped, or the given static [1]."""
    _check_call(fmt, scale)
    flat = x.reshape(-1, x.shape[-1]).float()
    if scale is not None:
        scales = scale.float().reshape(1)
        return _encode(flat / scales, fmt).reshape(x.shape), scales
    groups = grouped(flat, flat.shape[-1] if fmt.group_size == PER_TOKEN else fmt.group_size)
    if _uses_weight_int(fmt):
        weight_fmt = _weight_format(fmt)
        scales = group_params(groups, weight_fmt)[0].float()
        unsigned = encode(groups, scales.unsqueeze(-1), None, weight_fmt)
        codes = (unsigned.to(torch.int16) - implicit_zero(weight_fmt)).to(torch.int8)
    else:
        scales = _scales(groups.abs().amax(dim=-1), fmt)
        codes = _encode(groups / scales.unsqueeze(-1), fmt)
    codes = codes.reshape(flat.shape[0], -1)[:, : flat.shape[-1]]
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], -1)


def dequantize_activations(codes: Tensor, scales: Tensor, fmt: ActFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values that codes and scales from ``quantize_activations`` represent, in ``dtype``."""
    _check_call(fmt, scales if fmt.static else None)
    if fmt.group_size != PER_TOKEN:
        scales = scales.repeat_interleave(fmt.group_size, dim=-1)[..., : codes.shape[-1]]
    return (codes.float() * scales.float()).to(dtype)


def fake_quantize_activations(x: Tensor, fmt: ActFormat, scale: Tensor | None = None) -> Tensor:
    """``x`` rounded to ``fmt`` in its own dtype and shape: what a quantized-activation matmul computes with."""
    if fmt.is_fp4 and scale is None:
        return fake_quantize(x, _weight_format(fmt))
    codes, scales = quantize_activations(x, fmt, scale)
    return dequantize_activations(codes, scales, fmt, x.dtype)

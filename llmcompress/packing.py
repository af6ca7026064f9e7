"""Bit packing of codes into words, and the packed tensors one quantized layer stores.

INT codes of b bits form one LSB-first bitstream per row: code i occupies bits [i*b, i*b + b)
of the row, bit j of the stream is bit (j mod 32) of int32 word j // 32, and the last word is
zero-padded. For b in {2, 4, 8} this is the familiar "code i in bits (i mod 32/b)*b of word
i*b/32"; for b = 3, 5, 6, 7 codes straddle word boundaries. FP4 nibbles pack two per uint8,
the even element in the low nibble (NVFP4's layout).

Packed tensors of one layer (names follow compressed-tensors, layout is canonical [N, ...]):

- ``weight_packed``: int32 [N, ceil(K*b/32)] (INT) or uint8 [N, ceil(K/2)] (FP4)
- ``weight_scale``: [N, G] float16 / float8_e4m3fn / uint8 (see ``formats``)
- ``weight_zero_point``: int32 [N, ceil(G*b/32)], the zero points packed like the codes (asym INT)
- ``weight_global_scale``: float32 [1] (NVFP4)
- ``weight_g_idx``: int32 [K], the group of each input column, when GPTQ's act-order set it

and, as the layer's ``LayerLayout`` says:

- ``lowrank_a`` [r, K], ``lowrank_b`` [N, r]: the 16-bit branch ``B A``, float16, or int8 with
  one float16 scale per row in ``lowrank_a_scale`` [r] and ``lowrank_b_scale`` [N]
- ``smooth_scale``: float32 [K], SVDQuant's smoothing where it could not be folded away: the
  layer computes on ``x / smooth_scale``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import QuantFormat
from .formats import QuantizedWeight, num_groups

WORD_BITS = 32


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // WORD_BITS)


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., K] (each < 2^bits) -> int32 words [..., ceil(K*bits/32)]."""
    count = codes.shape[-1]
    words = packed_words(count, bits)
    flat = codes.reshape(-1, count).to(torch.int64)
    start = torch.arange(count, device=codes.device) * bits
    word, offset = start // WORD_BITS, start % WORD_BITS
    out = torch.zeros(flat.shape[0], words + 1, dtype=torch.int64, device=codes.device)
    # Bits never overlap, so adding the two halves of each code equals OR-ing them in.
    low = (flat << offset) & 0xFFFFFFFF
    high = flat >> (WORD_BITS - offset)
    out.scatter_add_(1, word.expand_as(flat), low)
    out.scatter_add_(1, (word + 1).expand_as(flat), high)
    out = out[:, :words]
    signed = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return signed.reshape(*codes.shape[:-1], words)


def unpack_int(words: Tensor, bits: int, count: int) -> Tensor:
    """int32 words [..., W] -> uint8 codes [..., count]; the inverse of ``pack_int``."""
    if words.shape[-1] != packed_words(count, bits):
        raise ValueError(f"{words.shape[-1]} words cannot hold {count} codes of {bits} bits")
    if WORD_BITS % bits == 0:
        # Whole codes per word: one shift per lane, no gathers (this runs on every reference forward).
        shifts = torch.arange(0, WORD_BITS, bits, device=words.device, dtype=torch.int32)
        lanes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return lanes.reshape(*words.shape[:-1], -1)[..., :count].to(torch.uint8)
    flat = words.reshape(-1, words.shape[-1]).to(torch.int64) & 0xFFFFFFFF
    flat = torch.nn.functional.pad(flat, (0, 1))
    start = torch.arange(count, device=words.device) * bits
    word, offset = start // WORD_BITS, start % WORD_BITS
    low = flat[:, word] >> offset
    high = flat[:, word + 1] << (WORD_BITS - offset)
    codes = (low | high) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*words.shape[:-1], count)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 4-bit codes [..., K] -> uint8 [..., ceil(K/2)], even element in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)[..., :count].contiguous()


BRANCH_TENSOR_PREFIXES = ("lowrank_", "smooth_")


@dataclass(frozen=True)
class LayerLayout:
    """What a compressed layer holds beyond its low-bit weight: a low-rank branch of ``rank``
    stored as ``lowrank_dtype``, an in-layer smoothing vector, and the format its activations
    are quantized to on the way into the low-bit matmul (W4A4)."""

    rank: int = 0
    lowrank_dtype: str = "float16"
    smoothed: bool = False
    act_format: QuantFormat | None = None

    def describe(self) -> str:
        parts = [f"rank {self.rank} ({self.lowrank_dtype})" if self.rank else "",
                 "smoothed" if self.smoothed else "",
                 f"activations {self.act_format.describe()}" if self.act_format else ""]
        return ", ".join(p for p in parts if p)


def packed_spec(fmt: QuantFormat, out_features: int, in_features: int, has_g_idx: bool = False,
                layout: LayerLayout = LayerLayout()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the tensors one layer stores: used to allocate before loading
    and to check a checkpoint before trusting it."""
    spec = _value_spec(fmt, out_features, in_features)
    if has_g_idx:
        spec["weight_g_idx"] = ((in_features,), torch.int32)
    if layout.rank:
        factor_dtype = torch.int8 if layout.lowrank_dtype == "int8" else torch.float16
        spec["lowrank_a"] = ((layout.rank, in_features), factor_dtype)
        spec["lowrank_b"] = ((out_features, layout.rank), factor_dtype)
        if layout.lowrank_dtype == "int8":
            spec["lowrank_a_scale"] = ((layout.rank,), torch.float16)
            spec["lowrank_b_scale"] = ((out_features,), torch.float16)
    if layout.smoothed:
        spec["smooth_scale"] = ((in_features,), torch.float32)
    return spec


def pack_branch(a: Tensor, b: Tensor, lowrank_dtype: str) -> dict[str, Tensor]:
    """The stored tensors of a branch ``b @ a`` (float32 in)."""
    if lowrank_dtype == "float16":
        return {"lowrank_a": a.to(torch.float16).contiguous(), "lowrank_b": b.to(torch.float16).contiguous()}
    tensors = {}
    for name, factor in (("lowrank_a", a), ("lowrank_b", b)):
        scale = (factor.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
        tensors[name] = torch.round(factor.float() / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8).contiguous()
        tensors[f"{name}_scale"] = scale
    return tensors


def unpack_branch(tensors: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A [r, K], B [N, r]) in ``dtype``."""
    factors = []
    for name in ("lowrank_a", "lowrank_b"):
        factor = tensors[name]
        scale = tensors.get(f"{name}_scale")
        factors.append(factor.to(dtype) if scale is None else (factor.float() * scale.float().unsqueeze(1)).to(dtype))
    return factors[0], factors[1]


def _value_spec(fmt: QuantFormat, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    groups = num_groups(fmt, in_features)
    if fmt.kind == "nvfp4":
        return {
            "weight_packed": ((out_features, -(-in_features // 2)), torch.uint8),
            "weight_scale": ((out_features, groups), torch.float8_e4m3fn),
            "weight_global_scale": ((1,), torch.float32),
        }
    if fmt.kind == "mxfp4":
        return {
            "weight_packed": ((out_features, -(-in_features // 2)), torch.uint8),
            "weight_scale": ((out_features, groups), torch.uint8),
        }
    spec = {
        "weight_packed": ((out_features, packed_words(in_features, fmt.bits)), torch.int32),
        "weight_scale": ((out_features, groups), torch.float16),
    }
    if not fmt.symmetric:
        spec["weight_zero_point"] = ((out_features, packed_words(groups, fmt.bits)), torch.int32)
    return spec


def pack_weight(q: QuantizedWeight, fmt: QuantFormat) -> dict[str, Tensor]:
    if fmt.is_fp4:
        tensors = {"weight_packed": pack_nibbles(q.codes), "weight_scale": q.scales}
        if q.global_scale is not None:
            tensors["weight_global_scale"] = q.global_scale
    else:
        tensors = {"weight_packed": pack_int(q.codes, fmt.bits), "weight_scale": q.scales}
        if q.zeros is not None:
            tensors["weight_zero_point"] = pack_int(q.zeros, fmt.bits)
    if q.g_idx is not None:
        tensors["weight_g_idx"] = q.g_idx.to(torch.int32)
    return tensors


def unpack_weight(tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int) -> QuantizedWeight:
    scales = tensors["weight_scale"]
    g_idx = tensors.get("weight_g_idx")
    if fmt.is_fp4:
        return QuantizedWeight(
            codes=unpack_nibbles(tensors["weight_packed"], in_features),
            scales=scales,
            global_scale=tensors.get("weight_global_scale"),
            g_idx=g_idx,
        )
    zeros = tensors.get("weight_zero_point")
    return QuantizedWeight(
        codes=unpack_int(tensors["weight_packed"], fmt.bits, in_features),
        scales=scales,
        zeros=None if zeros is None else unpack_int(zeros, fmt.bits, scales.shape[1]),
        g_idx=g_idx,
    )

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
- N:M sparse layers (``sparsity="2:4"``) store only the kept weights: ``weight_packed`` holds
  the K*N/M kept codes of each row in column order (scales and zero points still cover the
  K columns' groups), and ``weight_bitmask`` uint8 [N, ceil(K/8)] marks the kept positions,
  bit j % 8 of byte j // 8 (LSB first), one bit per weight, the size of 2:4's 2-bit indices and
  the layout of compressed-tensors' ``sparse-24-bitmask``. A pruned layer that stays in 16 bits
  stores its kept values as ``weight_values`` [N, K*N/M] instead of codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .actformat import ActFormat
from .config import QuantFormat, parse_n_m
from .formats import QuantizedWeight, group_index, implicit_zero, num_groups

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
# The tensors holding the weights themselves; the rest of a layer is the branch or metadata
# (scales, zero points, g_idx, sparsity masks).
VALUE_TENSORS = ("weight_packed", "weight_values", "weight")
VALUES_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class LayerLayout:
    """What a compressed layer holds beyond its low-bit weight: a low-rank branch of ``rank``
    stored as ``lowrank_dtype``, an in-layer smoothing vector, and the format its activations
    are quantized to on the way into the low-bit matmul (W4A4)."""

    rank: int = 0
    lowrank_dtype: str = "float16"
    smoothed: bool = False
    act_format: ActFormat | None = None
    # "N:M" where the weight is stored compact (kept values + bitmask); None: dense.
    sparsity: str | None = None
    # The dtype of ``weight_values`` for layers whose weight stays 16-bit.
    values_dtype: str = "float16"
    # An online rotation of the input (``rotate``'s ``online``): the order of the plain Hadamard
    # x is multiplied by first, block-diagonally where below in_features; 0: none.
    input_hadamard: int = 0

    def __post_init__(self) -> None:
        if self.sparsity is not None and parse_n_m(self.sparsity) is None:
            raise ValueError(f"layout sparsity {self.sparsity!r} is not N:M")
        if self.values_dtype not in VALUES_DTYPES:
            raise ValueError(f"layout values_dtype {self.values_dtype!r} is not one of {', '.join(VALUES_DTYPES)}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return None if self.sparsity is None else parse_n_m(self.sparsity)

    def stored_columns(self, in_features: int) -> int:
        """Weights stored per row: all K, or the K*N/M kept ones of an N:M layer."""
        if self.n_m is None:
            return in_features
        n, m = self.n_m
        return in_features // m * n

    def describe(self) -> str:
        parts = [f"input Hadamard {self.input_hadamard}" if self.input_hadamard else "",
                 f"rank {self.rank} ({self.lowrank_dtype})" if self.rank else "",
                 "smoothed" if self.smoothed else "",
                 f"activations {self.act_format.describe()}" if self.act_format else "",
                 f"{self.sparsity} sparse" if self.sparsity else ""]
        return ", ".join(p for p in parts if p)


def packed_spec(fmt: QuantFormat | None, out_features: int, in_features: int, has_g_idx: bool = False,
                layout: LayerLayout = LayerLayout()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the tensors one layer stores: used to allocate before loading
    and to check a checkpoint before trusting it. ``fmt=None``: a 16-bit N:M sparse weight."""
    stored = layout.stored_columns(in_features)
    if fmt is None:
        if layout.sparsity is None:
            raise ValueError("a layer without a quantization format is stored only as an N:M sparse weight")
        spec = {"weight_values": ((out_features, stored), getattr(torch, layout.values_dtype))}
    else:
        spec = _value_spec(fmt, out_features, in_features, stored)
    if layout.sparsity is not None:
        spec["weight_bitmask"] = ((out_features, -(-in_features // 8)), torch.uint8)
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
    if layout.act_format is not None and layout.act_format.static:
        spec["input_scale"] = ((1,), torch.float32)
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


def _value_spec(fmt: QuantFormat, out_features: int, in_features: int, stored: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    groups = num_groups(fmt, in_features)
    if fmt.kind == "nvfp4":
        return {
            "weight_packed": ((out_features, -(-stored // 2)), torch.uint8),
            "weight_scale": ((out_features, groups), torch.float8_e4m3fn),
            "weight_global_scale": ((1,), torch.float32),
        }
    if fmt.kind == "mxfp4":
        return {
            "weight_packed": ((out_features, -(-stored // 2)), torch.uint8),
            "weight_scale": ((out_features, groups), torch.uint8),
        }
    spec = {
        "weight_packed": ((out_features, packed_words(stored, fmt.bits)), torch.int32),
        "weight_scale": ((out_features, groups), torch.float16),
    }
    if not fmt.symmetric:
        spec["weight_zero_point"] = ((out_features, packed_words(groups, fmt.bits)), torch.int32)
    return spec


def pack_bits(mask: Tensor) -> Tensor:
    """bool [..., K] -> uint8 [..., ceil(K/8)], bit j % 8 of byte j // 8 (LSB first)."""
    count = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -count % 8))
    weights = 2 ** torch.arange(8, device=mask.device, dtype=torch.int32)
    return (padded.reshape(*mask.shape[:-1], -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """uint8 [..., ceil(K/8)] -> bool [..., count]; the inverse of ``pack_bits``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :count].bool()


def kept_values(values: Tensor, mask: Tensor, layout: LayerLayout) -> Tensor:
    """The kept entries of [N, K] ``values`` as [N, K*N/M], checking the mask is N:M exactly."""
    rows, in_features = values.shape
    n, m = layout.n_m
    if in_features % m or (mask.reshape(rows, -1, m).sum(-1) != n).any():
        raise ValueError(f"the mask is not {layout.sparsity}: every run of {m} inputs must keep exactly {n}")
    return values[mask].reshape(rows, layout.stored_columns(in_features))


def pack_weight(q: QuantizedWeight, fmt: QuantFormat, layout: LayerLayout = LayerLayout(), mask: Tensor | None = None) -> dict[str, Tensor]:
    """The stored tensors of a quantized weight; N:M layouts keep only the codes ``mask`` keeps."""
    codes = q.codes
    if layout.sparsity is not None:
        if mask is None:
            raise ValueError(f"an {layout.sparsity} sparse layout needs the pruning mask")
        codes = kept_values(codes, mask, layout)
    if fmt.is_fp4:
        tensors = {"weight_packed": pack_nibbles(codes), "weight_scale": q.scales}
        if q.global_scale is not None:
            tensors["weight_global_scale"] = q.global_scale
    else:
        tensors = {"weight_packed": pack_int(codes, fmt.bits), "weight_scale": q.scales}
        if q.zeros is not None:
            tensors["weight_zero_point"] = pack_int(q.zeros, fmt.bits)
    if q.g_idx is not None:
        tensors["weight_g_idx"] = q.g_idx.to(torch.int32)
    if layout.sparsity is not None:
        tensors["weight_bitmask"] = pack_bits(mask)
    return tensors


def pack_sparse_values(weight: Tensor, mask: Tensor, layout: LayerLayout) -> dict[str, Tensor]:
    """The stored tensors of a 16-bit N:M sparse weight."""
    return {"weight_values": kept_values(weight, mask, layout).to(getattr(torch, layout.values_dtype)),
            "weight_bitmask": pack_bits(mask)}


def unpack_sparse_values(tensors: dict[str, Tensor], in_features: int, dtype: torch.dtype) -> Tensor:
    """The dense [N, K] weight of a 16-bit N:M sparse layer, zeros where pruned."""
    mask = unpack_bits(tensors["weight_bitmask"], in_features)
    dense = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    dense[mask] = tensors["weight_values"].reshape(-1).to(dtype)
    return dense


def unpack_weight(tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, layout: LayerLayout = LayerLayout()) -> QuantizedWeight:
    """The canonical dense codes; pruned positions of an N:M layer get the code of zero."""
    scales = tensors["weight_scale"]
    g_idx = tensors.get("weight_g_idx")
    stored = layout.stored_columns(in_features)
    zeros = tensors.get("weight_zero_point")
    zeros = None if zeros is None else unpack_int(zeros, fmt.bits, scales.shape[1])
    if fmt.is_fp4:
        codes = unpack_nibbles(tensors["weight_packed"], stored)
    else:
        codes = unpack_int(tensors["weight_packed"], fmt.bits, stored)
    if layout.sparsity is not None:
        codes = _scatter_kept_codes(codes, unpack_bits(tensors["weight_bitmask"], in_features), fmt, zeros, g_idx)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, global_scale=tensors.get("weight_global_scale"), g_idx=g_idx)


def _scatter_kept_codes(kept: Tensor, mask: Tensor, fmt: QuantFormat, zeros: Tensor | None, g_idx: Tensor | None) -> Tensor:
    rows, in_features = mask.shape
    if fmt.is_fp4:
        dense = torch.zeros(rows, in_features, dtype=torch.uint8, device=kept.device)
    elif zeros is None:
        dense = torch.full((rows, in_features), implicit_zero(fmt), dtype=torch.uint8, device=kept.device)
    else:
        dense = zeros[:, group_index(g_idx, fmt, in_features, kept.device)].clone()
    dense[mask] = kept.reshape(-1)
    return dense

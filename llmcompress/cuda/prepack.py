"""Reorder one layer's canonical packed tensors into the layout the kernel sources of ``kernels/`` read.

Pure tensor functions (they run on any device, so the CPU tests check the layout): the kernel
contract is written at the top of ``kernels/w4_common.cuh``, which every source includes, and
each constant here names the part of it that it implements. The checkpoint never sees this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import QuantFormat
from ..formats import QuantizedWeight, group_width
from ..packing import LayerLayout, unpack_branch, unpack_weight

ROW_TILE = 16
K_BLOCK = 64
LANES = 32
STEPS = 4  # 16-column mma steps per 64-column k-block
# Fragment element e of lane (g, t) = lane // 4, lane % 4 covers row g + FRAGMENT_ROW[e] and
# column 2t + FRAGMENT_COL[e] of a 16 x 16 tile (mma.m16n8k16's A operand).
FRAGMENT_ROW = (0, 0, 8, 8, 0, 0, 8, 8)
FRAGMENT_COL = (0, 1, 0, 1, 8, 9, 8, 9)
# Nibble of the 32-bit word that holds element e: INT4 decodes pair p from nibbles p and p+4,
# FP4 from the nibble pairs a byte permute reads (see decode_word in the kernel).
INT4_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
FP4_NIBBLE = (1, 3, 5, 7, 0, 2, 4, 6)
# What the INT4 decoder ORs a code into: 1024.0 in FP16, 128.0 in BF16 (magic + code is exact).
INT4_MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}
SYMMETRIC_ZERO = 8
# The kernel stages the branch's intermediate t = x A^T through the shared-memory chunk of x.
MAX_RANK = 256
# Bytes of one scale record (the scales, and zero points, of one lane group g of one k-block).
RECORD_BYTES = 8
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class Unsupported(ValueError):
    """The layer is valid but the fused kernel does not cover it; the reference path does."""


@dataclass(frozen=True)
class Prepacked:
    """One layer in kernel layout, for activations of ``dtype`` on one device."""

    kind: str  # the kernel variant: "int4" (groups >= 64), "int4g32", "nvfp4", "mxfp4"
    dtype: torch.dtype
    out_features: int
    in_features: int
    group_size: int  # effective: per-channel becomes the padded K, so every column is group 0
    rank: int
    qweight: Tensor  # int32 [RT, KB, 32, 4]
    records: Tensor  # uint8 [RT, KB, 8, 8 or 16]: per k-block scales (and magic + zero points)
    perm: Tensor | None  # int32 [K]: x's column feeding each prepacked column (act-order)
    lowrank_a: Tensor | None  # dtype [Rpad, Kpad]
    lowrank_b: Tensor | None  # dtype [Npad, Rpad]
    out_scale: float
    scale_shift: int


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def kernel_group_size(fmt: QuantFormat, in_features: int) -> int:
    width = group_width(fmt, in_features)
    if width == in_features and fmt.group_size == -1:
        return _ceil_to(in_features, K_BLOCK)
    if width % K_BLOCK == 0 or width == 32 or (fmt.kind == "nvfp4" and width == 16):
        return width
    raise Unsupported(f"group size {width}: the kernel takes 32 or a multiple of 64 (16 for NVFP4)")


def check_supported(fmt: QuantFormat, layout: LayerLayout, dtype: torch.dtype) -> None:
    """Raise ``Unsupported`` naming the first thing the kernel does not cover."""
    if dtype not in KERNEL_DTYPES:
        raise Unsupported(f"activations in {dtype}: the kernel takes float16 or bfloat16")
    if fmt.kind == "int" and fmt.bits != 4:
        raise Unsupported(f"INT{fmt.bits}: the kernel takes 4-bit weights")
    if layout.act_format is not None:
        raise Unsupported("quantized activations (W4A4): the kernel computes W4A16")
    if layout.smoothed:
        raise Unsupported("an in-layer smoothing vector: fold it into the previous layer")
    if layout.input_hadamard:
        raise Unsupported("an online input rotation (rotate's online Hadamard)")
    if layout.rank > MAX_RANK:
        raise Unsupported(f"rank {layout.rank} > {MAX_RANK}")


def fragment_words(codes: Tensor, nibble_of_element: tuple[int, ...]) -> Tensor:
    """uint8 codes [Npad, Kpad] -> int32 [RT, KB, 32, 4], one word per lane and mma step."""
    rows, cols = codes.shape
    tiles = codes.reshape(rows // ROW_TILE, ROW_TILE, cols // K_BLOCK, STEPS, 16).permute(0, 2, 3, 1, 4)
    lane = torch.arange(LANES, device=codes.device)
    row = (lane // 4).unsqueeze(1) + torch.tensor(FRAGMENT_ROW, device=codes.device)
    col = (2 * (lane % 4)).unsqueeze(1) + torch.tensor(FRAGMENT_COL, device=codes.device)
    elements = tiles[:, :, :, row, col].to(torch.int64)  # [RT, KB, 4, 32, 8]
    shifts = 4 * torch.tensor(nibble_of_element, device=codes.device, dtype=torch.int64)
    words = (elements << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(0, 1, 3, 2).contiguous()


def block_records(values: list[Tensor], out_features: int, in_features: int, group_size: int) -> Tensor:
    """Per-group values [N, G] (each in ``values``, concatenated in order) -> the kernel's
    records uint8 [RT, KB, 8, bytes]: for lane group g of each k-block, values[i] of rows g and
    g+8 for the GPB groups the k-block covers (groups past G repeat the last; x is zero there)."""
    groups_per_block = max(1, K_BLOCK // group_size)
    blocks = -(-in_features // K_BLOCK)
    columns = torch.arange(blocks, device=values[0].device).unsqueeze(1) * K_BLOCK + (
        torch.arange(groups_per_block, device=values[0].device) * group_size)
    groups = (columns // group_size).clamp(max=values[0].shape[1] - 1).reshape(-1)  # [KB * GPB]
    padded_rows = _ceil_to(out_features, ROW_TILE)
    parts = []
    for value in values:
        rows = torch.zeros(padded_rows, value.shape[1], dtype=value.dtype, device=value.device)
        rows[:out_features] = value
        picked = rows[:, groups].reshape(padded_rows // ROW_TILE, 2, 8, blocks, groups_per_block)
        parts.append(picked.permute(0, 3, 2, 1, 4).reshape(padded_rows // ROW_TILE, blocks, 8, -1).contiguous().view(torch.uint8))
    record = torch.cat(parts, dim=-1)
    width = max(RECORD_BYTES, record.shape[-1])
    return torch.nn.functional.pad(record, (0, width - record.shape[-1])).contiguous()


def _act_order_permutation(q: QuantizedWeight, group_size: int) -> Tensor:
    """Columns sorted by group; act-order groups are then contiguous runs of group_size."""
    perm = torch.argsort(q.g_idx.long(), stable=True)
    expected = torch.arange(perm.numel(), device=perm.device) // group_size
    if not torch.equal(q.g_idx.long()[perm], expected):
        raise Unsupported("act-order groups of unequal size cannot be made contiguous")
    return perm


def prepack(tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, layout: LayerLayout,
            dtype: torch.dtype) -> Prepacked:
    """The kernel layout of one layer's packed tensors (on their device), for ``dtype`` inputs."""
    check_supported(fmt, layout, dtype)
    # An N:M layer runs as the dense weight it represents: correct, though no faster.
    q = unpack_weight(tensors, fmt, in_features, layout)
    out_features = q.codes.shape[0]
    group_size = kernel_group_size(fmt, in_features)
    perm = None if q.g_idx is None else _act_order_permutation(q, group_width(fmt, in_features))
    codes = q.codes if perm is None else q.codes[:, perm]
    n_pad, k_pad = _ceil_to(out_features, ROW_TILE), _ceil_to(in_features, K_BLOCK)
    padded = torch.zeros(n_pad, k_pad, dtype=torch.uint8, device=codes.device)
    padded[:out_features, :in_features] = codes
    records, out_scale, scale_shift = _records(q, fmt, dtype, group_size, out_features, in_features)
    lowrank_a = lowrank_b = None
    if layout.rank:
        a, b = unpack_branch(tensors, dtype)
        if perm is not None:
            a = a[:, perm]
        r_pad = _ceil_to(layout.rank, 16)
        lowrank_a = torch.zeros(r_pad, k_pad, dtype=dtype, device=a.device)
        lowrank_a[: layout.rank, :in_features] = a
        lowrank_b = torch.zeros(n_pad, r_pad, dtype=dtype, device=b.device)
        lowrank_b[:out_features, : layout.rank] = b
    nibbles = FP4_NIBBLE if fmt.is_fp4 else INT4_NIBBLE
    kind = fmt.kind if fmt.is_fp4 else ("int4g32" if group_size == 32 else "int4")
    return Prepacked(
        kind=kind, dtype=dtype, out_features=out_features, in_features=in_features,
        group_size=group_size, rank=layout.rank, qweight=fragment_words(padded, nibbles), records=records,
        perm=None if perm is None else perm.to(torch.int32).contiguous(), lowrank_a=lowrank_a, lowrank_b=lowrank_b,
        out_scale=out_scale, scale_shift=scale_shift)


def _records(q: QuantizedWeight, fmt: QuantFormat, dtype: torch.dtype, group_size: int, out_features: int,
             in_features: int) -> tuple[Tensor, float, int]:
    """The scale records, out_scale and scale_shift of the kernel contract."""
    if fmt.kind == "nvfp4":
        # The kernel reads E4M3 bits as FP16 bits at 2^-8 of their value (exact, subnormals too).
        records = block_records([q.scales.view(torch.uint8)], out_features, in_features, group_size)
        return records, 256.0 / float(q.global_scale.float().item()), 0
    if fmt.kind == "mxfp4":
        # Shift the exponents so that the largest scale is 1: FP16 then holds every scale
        # within 2^-24 of it (the kernel multiplies the product back by 2^shift).
        shift = int(q.scales.max().item()) - 127
        return block_records([q.scales], out_features, in_features, group_size), 2.0**shift, shift
    zeros = torch.full_like(q.scales, SYMMETRIC_ZERO, dtype=torch.float32) if q.zeros is None else q.zeros.float()
    values = [q.scales.to(dtype), (zeros + INT4_MAGIC[dtype]).to(dtype)]
    return block_records(values, out_features, in_features, group_size), 1.0, 0

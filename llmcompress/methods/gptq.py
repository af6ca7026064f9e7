"""GPTQ (Frantar et al., 2022): quantize columns one at a time and spread each column's error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Pure function: weight [N, K] and H = mean x x^T [K, K] in, a ``GPTQResult`` out. The same loop
prunes (SparseGPT) when given a mask or a sparsity.
Details that matter for quality and robustness:

- dead input channels (H_jj = 0: the channel never fired) get H_jj = 1 and a zero weight;
- dampening adds ``damp * mean(diag H)`` to the diagonal; when the Cholesky factorisation
  still fails, the dampening is multiplied by 10 (up to 1.0, i.e. 100%) and the value used is
  returned so the caller can report it;
- lazy batch updates: columns are processed in blocks, the rest of the matrix is updated once
  per block (the result is the same as column by column, the memory traffic much smaller);
- act-order quantizes columns by descending H_jj. Groups then follow that order, so column j
  belongs to group ``g_idx[j]``; ``static_groups`` instead fixes every group's parameters up
  front on contiguous columns, so groups stay contiguous and no ``g_idx`` is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import QuantFormat
from ..formats import QuantizedWeight, decode, encode, group_params, group_width, grouped, multipliers, num_groups, nvfp4_global_scale
from .prune import check_n_m, keep_largest, pruned_before

MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQResult:
    """``quantized`` is None when no format was given (pruning alone); ``weight`` is the float32
    [N, K] weight the layer now computes with; ``mask`` (True = kept) when pruning was asked."""

    quantized: QuantizedWeight | None
    weight: Tensor
    mask: Tensor | None
    damp: float
    dead_columns: int


class _Groups:
    """Per-group parameters, filled in as GPTQ reaches each group (or all at once, if static)."""

    def __init__(self, fmt: QuantFormat, rows: int, count: int, global_scale: Tensor | None, device: torch.device) -> None:
        self.fmt, self.global_scale = fmt, global_scale
        scale_dtype = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.uint8}.get(fmt.kind, torch.float16)
        self.scales = torch.zeros(rows, count, dtype=scale_dtype, device=device)
        self.zeros = None if fmt.is_fp4 or fmt.symmetric else torch.zeros(rows, count, dtype=torch.uint8, device=device)

    def fit(self, index: int, columns: Tensor) -> None:
        scales, zeros = group_params(columns.unsqueeze(1), self.fmt, self.global_scale)
        self.scales[:, index] = scales[:, 0]
        if self.zeros is not None:
            self.zeros[:, index] = zeros[:, 0]

    def round(self, index: int, column: Tensor) -> tuple[Tensor, Tensor]:
        multiplier = multipliers(self.scales[:, index], self.fmt, self.global_scale)
        zeros = None if self.zeros is None else self.zeros[:, index]
        codes = encode(column, multiplier, zeros, self.fmt)
        return codes, decode(codes, multiplier, zeros, self.fmt)


def gptq(weight: Tensor, hessian: Tensor, fmt: QuantFormat | None, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, static_groups: bool = False, mask: Tensor | None = None,
         sparsity: float | None = None, n_m: tuple[int, int] | None = None, ranges: Tensor | None = None) -> GPTQResult:
    """GPTQ-quantize a [N, K] weight given its inputs' second moment H = mean x x^T [K, K].

    ``ranges`` (static groups only) is a [N, K] weight whose groups set the parameters instead
    of the weight's own, e.g. the weight with each group's range shrunk by a clipping search:
    GPTQ still targets the original weight, and what falls outside a shrunk range is clamped
    and its error spread over the later columns like any rounding error.

    Pruning rides on the same column loop (SparseGPT, Frantar & Alistarh, 2023): a fixed
    ``mask`` (True = kept, e.g. Wanda's) zeroes its weights as they are reached, and ``sparsity``
    (with ``n_m`` for N:M) makes the loop choose the mask itself from ``w^2 / [H^-1]_jj^2`` of
    the columns as updated so far: per 128-column block for unstructured masks (each row's exact
    total split over the blocks), per run of M for N:M. Pruned weights' error is spread over
    the remaining columns like a rounding error. ``fmt=None`` prunes without quantizing.
    N:M runs follow the input order, so SparseGPT's N:M choice turns act-order off.
    """
    rows, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian is {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    if mask is not None and sparsity is not None:
        raise ValueError("give either a fixed mask or a sparsity for SparseGPT to choose one, not both")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask is {tuple(mask.shape)}, expected {tuple(weight.shape)}")
    if fmt is None and mask is None and sparsity is None:
        raise ValueError("nothing to do: give a format, a mask or a sparsity")
    if ranges is not None and (not static_groups or ranges.shape != weight.shape):
        raise ValueError(f"ranges must be a {tuple(weight.shape)} weight and needs static groups "
                         f"(got {tuple(ranges.shape)}, static_groups={static_groups})")
    work = weight.detach().float().clone()
    hessian = hessian.detach().float().clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    pruning = mask is not None or sparsity is not None
    keep = (mask.to(work.device, torch.bool).clone() if mask is not None
            else torch.ones(rows, in_features, dtype=torch.bool, device=work.device))
    if n_m is not None and sparsity is not None:
        check_n_m(in_features, n_m)
        act_order = False
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])
    work = work * keep
    groups = None
    if fmt is not None:
        width = group_width(fmt, in_features)
        global_scale = nvfp4_global_scale(work) if fmt.kind == "nvfp4" else None
        groups = _Groups(fmt, rows, num_groups(fmt, in_features), global_scale, work.device)
        if static_groups:
            source = work
            if ranges is not None:
                source = ranges.to(work.device, torch.float32) * keep
                source[:, dead] = 0.0
            scales, zeros = group_params(grouped(source, width), fmt, global_scale)
            groups.scales.copy_(scales)
            if groups.zeros is not None:
                groups.zeros.copy_(zeros)
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(in_features, device=work.device)
    if act_order:  # permuting copies H twice; the identity order can skip it
        work, hessian, keep = work[:, order], hessian[order][:, order], keep[:, order]
    hessian_inverse, damp_used = _inverse_cholesky(hessian, damp)
    del hessian

    codes = torch.zeros(rows, in_features, dtype=torch.uint8, device=work.device) if fmt is not None else None
    result = torch.zeros_like(work)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = hessian_inverse[start:end, start:end]
        inverse_diagonal = torch.diagonal(inverse_block)
        if sparsity is not None and n_m is None:
            pruned = pruned_before(end, sparsity) - pruned_before(start, sparsity)
            keep[:, start:end] = keep_largest(_saliency(block, inverse_diagonal), end - start - pruned)
        for offset in range(end - start):
            position = start + offset
            if sparsity is not None and n_m is not None and offset % n_m[1] == 0:
                run = slice(offset, offset + n_m[1])
                keep[:, position:position + n_m[1]] = keep_largest(_saliency(block[:, run], inverse_diagonal[run]), n_m[0])
            column = block[:, offset]
            kept = column * keep[:, position] if pruning else column
            if groups is None:
                rounded = kept
            else:
                column_index = int(order[position])
                group = column_index // width if static_groups else position // width
                if not static_groups and position % width == 0:
                    pending = torch.cat([block[:, offset:], work[:, end:]], dim=1)[:, :width]
                    # Weights already marked for pruning must not widen the group's range.
                    groups.fit(group, pending * keep[:, position:position + pending.shape[1]])
                column_codes, rounded = groups.round(group, kept)
                codes[:, position] = column_codes
            result[:, position] = rounded
            error = (column - rounded) / inverse_block[offset, offset]
            block[:, offset:] -= error.unsqueeze(1) * inverse_block[offset, offset:].unsqueeze(0)
            errors[:, offset] = error
        work[:, end:] -= errors @ hessian_inverse[start:end, end:]

    inverse_order = torch.argsort(order)
    quantized = None
    if fmt is not None:
        g_idx = (inverse_order // width).to(torch.int32) if act_order and not static_groups else None
        quantized = QuantizedWeight(codes=codes[:, inverse_order].contiguous(), scales=groups.scales, zeros=groups.zeros,
                                    global_scale=groups.global_scale, g_idx=g_idx)
    return GPTQResult(quantized=quantized, weight=result[:, inverse_order].contiguous(),
                      mask=keep[:, inverse_order].contiguous() if pruning else None, damp=damp_used, dead_columns=int(dead.sum()))


def _saliency(columns: Tensor, inverse_diagonal: Tensor) -> Tensor:
    """SparseGPT's cost of pruning each weight, w^2 / [H^-1]_jj^2 (higher: more worth keeping)."""
    return columns.square() / inverse_diagonal.square()


def _inverse_cholesky(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of H^-1, raising the dampening until H + damp * mean(diag) I factorises."""
    mean_diagonal = float(torch.diagonal(hessian).mean())
    current = damp
    while True:
        # One K x K temporary at a time (K is 14336 in an 8B model's down_proj: 800 MB each).
        damped = hessian.clone()
        damped.diagonal().add_(current * mean_diagonal)
        try:
            lower = torch.linalg.cholesky(damped)
            del damped
            inverse = torch.cholesky_inverse(lower)
            del lower
            return torch.linalg.cholesky(inverse, upper=True), current
        except torch.linalg.LinAlgError:
            if current >= MAX_DAMP:
                raise
            current = min(current * 10, MAX_DAMP)

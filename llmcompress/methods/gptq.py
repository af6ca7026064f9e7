"""GPTQ (Frantar et al., 2022): quantize columns one at a time and spread each column's error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Pure function: weight [N, K] and H = mean x x^T [K, K] in, a ``QuantizedWeight`` out.
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

MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQResult:
    quantized: QuantizedWeight
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


def gptq(weight: Tensor, hessian: Tensor, fmt: QuantFormat, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """GPTQ-quantize a [N, K] weight given its inputs' second moment H = mean x x^T [K, K]."""
    rows, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian is {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    work = weight.detach().float().clone()
    hessian = hessian.detach().float().clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    width = group_width(fmt, in_features)
    global_scale = nvfp4_global_scale(work) if fmt.kind == "nvfp4" else None
    groups = _Groups(fmt, rows, num_groups(fmt, in_features), global_scale, work.device)
    if static_groups:
        scales, zeros = group_params(grouped(work, width), fmt, global_scale)
        groups.scales.copy_(scales)
        if groups.zeros is not None:
            groups.zeros.copy_(zeros)
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(in_features, device=work.device)
    work, hessian = work[:, order], hessian[order][:, order]
    hessian_inverse, damp_used = _inverse_cholesky(hessian, damp)

    codes = torch.zeros(rows, in_features, dtype=torch.uint8, device=work.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = hessian_inverse[start:end, start:end]
        for offset in range(end - start):
            position = start + offset
            column_index = int(order[position])
            group = column_index // width if static_groups else position // width
            if not static_groups and position % width == 0:
                pending = torch.cat([block[:, offset:], work[:, end:]], dim=1)[:, :width]
                groups.fit(group, pending)
            column = block[:, offset]
            column_codes, rounded = groups.round(group, column)
            codes[:, position] = column_codes
            error = (column - rounded) / inverse_block[offset, offset]
            block[:, offset:] -= error.unsqueeze(1) * inverse_block[offset, offset:].unsqueeze(0)
            errors[:, offset] = error
        work[:, end:] -= errors @ hessian_inverse[start:end, end:]

    inverse_order = torch.argsort(order)
    g_idx = None
    if act_order and not static_groups:
        g_idx = (inverse_order // width).to(torch.int32)
    quantized = QuantizedWeight(codes=codes[:, inverse_order].contiguous(), scales=groups.scales, zeros=groups.zeros,
                                global_scale=global_scale, g_idx=g_idx)
    return GPTQResult(quantized=quantized, damp=damp_used, dead_columns=int(dead.sum()))


def _inverse_cholesky(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of H^-1, raising the dampening until H + damp * mean(diag) I factorises."""
    mean_diagonal = float(torch.diagonal(hessian).mean())
    identity = torch.eye(hessian.shape[0], device=hessian.device)
    current = damp
    while True:
        try:
            lower = torch.linalg.cholesky(hessian + current * mean_diagonal * identity)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True), current
        except torch.linalg.LinAlgError:
            if current >= MAX_DAMP:
                raise
            current = min(current * 10, MAX_DAMP)

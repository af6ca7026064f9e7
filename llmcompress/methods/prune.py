"""Pruning masks as pure tensor functions: magnitude and Wanda scores, and exact-count masks.

A mask is a bool tensor shaped like the weight, True where a weight is kept. Counts are exact:

- unstructured: every output row loses ``floor(sparsity * in_features)`` weights (the smallest
  scores of that row; ``topk`` settles ties, so the count is exact even among equal scores);
- N:M: every run of M consecutive inputs of a row keeps its N largest scores.

SparseGPT's mask is chosen inside GPTQ's column loop (``methods.gptq``), from the scores
``w^2 / [H^-1]_jj^2`` of the columns as the updates leave them; it uses ``pruned_before`` and
``keep_largest`` from here so that its counts are exact in the same sense.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A product such as 0.29 * 100 lands on 28.999999999999996; the count means 29.
_COUNT_SLACK = 1e-9


def pruned_before(columns: int, sparsity: float) -> int:
    """How many of a row's first ``columns`` weights an unstructured mask removes in all.

    Differences of this function split a row's exact total over column blocks."""
    return math.floor(columns * sparsity + _COUNT_SLACK)


def keep_largest(scores: Tensor, keep: int) -> Tensor:
    """Mask keeping the ``keep`` largest scores along the last dimension (exactly that many)."""
    width = scores.shape[-1]
    if not 0 <= keep <= width:
        raise ValueError(f"cannot keep {keep} of {width} entries")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep:
        mask.scatter_(-1, torch.topk(scores, keep, dim=-1, sorted=False).indices, True)
    return mask


def mask_from_scores(scores: Tensor, sparsity: float, n_m: tuple[int, int] | None) -> Tensor:
    """The exact-count mask of a [N, K] score matrix (higher score = more worth keeping)."""
    rows, in_features = scores.shape
    if n_m is None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity {sparsity} is not in [0, 1)")
        return keep_largest(scores.float(), in_features - pruned_before(in_features, sparsity))
    n, m = n_m
    check_n_m(in_features, n_m)
    runs = scores.float().reshape(rows, in_features // m, m)
    return keep_largest(runs, n).reshape(rows, in_features)


def check_n_m(in_features: int, n_m: tuple[int, int]) -> None:
    n, m = n_m
    if not 0 < n < m:
        raise ValueError(f"pattern {n}:{m} must keep 0 < N < M of every M inputs")
    if in_features % m:
        raise ValueError(f"pattern {n}:{m} needs in_features divisible by {m}, got {in_features}")


def magnitude_mask(weight: Tensor, sparsity: float, n_m: tuple[int, int] | None) -> Tensor:
    """Remove the smallest |w| of each row (or of each run of M)."""
    return mask_from_scores(weight.abs(), sparsity, n_m)


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """Wanda's score |w_ij| * ||x_j||_2, with ``input_norms`` [K] the inputs' L2 norms over the
    calibration tokens (any positive multiple of them ranks the same within a row)."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms is {tuple(input_norms.shape)}, expected ({weight.shape[1]},)")
    return weight.float().abs() * input_norms.float().unsqueeze(0)


def input_norms_from_hessian(hessian: Tensor) -> Tensor:
    """sqrt(diag H) for H = mean x x^T: the inputs' L2 norms divided by sqrt(tokens)."""
    return torch.diagonal(hessian).float().clamp(min=0).sqrt()


def wanda_mask(weight: Tensor, input_norms: Tensor, sparsity: float, n_m: tuple[int, int] | None) -> Tensor:
    return mask_from_scores(wanda_scores(weight, input_norms), sparsity, n_m)

"""Low-rank branches beside a quantized weight, as pure tensor functions.

A branch is ``B @ A`` (B: [N, r], A: [r, K]) added to the dequantized weight, so a layer computes
``Q(W) x + B (A x)``. Three ways to fit it:

- **LoRC** (ZeroQuant-V2): the best rank-r approximation of the error ``E = W - Q(W)`` in the
  Frobenius norm, from its SVD. Needs no data.
- **EoRA**: the best rank-r approximation of E in the norm the layer's outputs see,
  ``||E X||``: with ``H = Q diag(l) Q^T`` (the mean of x x^T), fit ``E Q diag(sqrt l)`` by SVD and
  map back, so the rank goes to the directions the activations use.
- **SVDQuant**: smooth the activation outliers into the weight (``W diag(lambda)``, inputs
  ``x / lambda``), keep the top-r singular directions of the smoothed weight in 16 bits and
  quantize only the residual.

Singular values are split evenly between B and A (``sqrt(s)`` each), which keeps both factors
in a range float16 holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..actformat import ActFormat, fake_quantize_activations, static_scale
from ..config import QuantFormat
from ..formats import dequantize, quantize
from .awq import output_error_sum


@dataclass(frozen=True)
class LowRank:
    """``b @ a`` approximates a matrix: a is [r, K], b is [N, r] (float32)."""

    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def matrix(self) -> Tensor:
        return self.b @ self.a


def empty_branch(out_features: int, in_features: int, device: torch.device | None = None) -> LowRank:
    return LowRank(a=torch.zeros(0, in_features, device=device), b=torch.zeros(out_features, 0, device=device))


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets (U [N, r], S [r], Vh [r, K]) in the input's float dtype."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _balanced(u: Tensor, s: Tensor, vh: Tensor) -> LowRank:
    root = s.sqrt()
    return LowRank(a=(root.unsqueeze(1) * vh).float(), b=(u * root).float())


def lorc(error: Tensor, rank: int) -> LowRank:
    """Rank-``rank`` branch minimising ``||E - B A||_F``."""
    _check_rank(error, rank)
    if rank == 0:
        return empty_branch(*error.shape, device=error.device)
    return _balanced(*truncated_svd(error.float(), rank))


@dataclass(frozen=True)
class Eigenbasis:
    """The activations' eigenbasis: H = vectors diag(values) vectors^T, values floored."""

    vectors: Tensor  # [K, K] float64
    root: Tensor  # [K] sqrt of the floored eigenvalues, float64


def eigenbasis(hessian: Tensor, damp: float = 0.01) -> Eigenbasis:
    """Eigendecomposition of H in float64, with eigenvalues floored at ``damp`` x their mean.

    A layer that saw few tokens has a rank-deficient H (zero and slightly negative eigenvalues);
    the floor keeps the inverse finite and makes the fit, in directions no activation used,
    fall back to LoRC's plain Frobenius error instead of amplifying them."""
    values, vectors = torch.linalg.eigh(hessian.double())
    values = values.clamp(min=0)
    mean = float(values.mean())
    floor = damp * mean if mean > 0 else 1.0
    return Eigenbasis(vectors=vectors, root=values.clamp(min=floor).sqrt())


def eora(error: Tensor, hessian: Tensor | Eigenbasis, rank: int, damp: float = 0.01) -> LowRank:
    """Rank-``rank`` branch minimising ``||(E - B A) X||``, i.e. ``tr((E - BA) H (E - BA)^T)``."""
    _check_rank(error, rank)
    if rank == 0:
        return empty_branch(*error.shape, device=error.device)
    basis = _as_basis(hessian, damp)
    u, s, vh = truncated_svd(_in_scaled_basis(error, basis), rank)
    # Vh lives in the scaled eigenbasis; undo the scaling and the rotation to act on x.
    vh = (vh / basis.root) @ basis.vectors.T
    return _balanced(u, s, vh)


def error_spectrum(error: Tensor, hessian: Tensor | Eigenbasis | None, damp: float = 0.01) -> Tensor:
    """Squared singular values of the error in the norm its branch minimises (descending):
    entry i is what the i-th rank removes from ``||E X||^2`` (EoRA) or ``||E||^2`` (LoRC)."""
    if hessian is None:
        return torch.linalg.svdvals(error.float()).double().square()
    return torch.linalg.svdvals(_in_scaled_basis(error, _as_basis(hessian, damp))).square()


def _as_basis(hessian: Tensor | Eigenbasis, damp: float) -> Eigenbasis:
    return hessian if isinstance(hessian, Eigenbasis) else eigenbasis(hessian, damp)


def _in_scaled_basis(error: Tensor, basis: Eigenbasis) -> Tensor:
    """``E Q diag(sqrt l)``: the error whose Frobenius norm is ``||E X||``."""
    return (error.double() @ basis.vectors) * basis.root


def allocate_ranks(spectra: dict[str, Tensor], costs: dict[str, int], budget: int, limits: dict[str, int]) -> dict[str, int]:
    """Ranks per layer under a parameter budget, greedily by error removed per parameter.

    ``spectra[name]`` holds the (relative) error each successive rank removes, descending;
    ``costs[name]`` the parameters one rank costs (N + K). Within a layer every rank costs the
    same and removes less than the one before, so the greedy order always extends a layer's
    ranks from the top."""
    candidates = sorted(
        ((float(gain) / costs[name], name) for name, spectrum in spectra.items() for gain in spectrum[: limits[name]]),
        key=lambda c: -c[0],
    )
    ranks = dict.fromkeys(spectra, 0)
    spent = 0
    for _, name in candidates:
        if spent + costs[name] <= budget:
            ranks[name] += 1
            spent += costs[name]
    return ranks


# ----------------------------------------------------------------------------- SVDQuant


@dataclass(frozen=True)
class SmoothSearch:
    """SVDQuant's smoothing for a group of layers sharing an input: ``lambda`` and its exponent
    (None where no smoothing beat lambda = 1)."""

    smooth: Tensor  # [K] float32; weights become W diag(smooth), inputs x / smooth
    alpha: float | None
    error: float
    error_unsmoothed: float


@dataclass(frozen=True)
class SVDQuantPart:
    """One layer after the SVDQuant split, acting on smoothed inputs ``x / lambda``: the
    dequantized low-bit residual and the 16-bit branch."""

    residual: Tensor  # [N, K] float32
    branch: LowRank


def smoothing_vector(act_abs_max: Tensor, weight_abs_max: Tensor, alpha: float) -> Tensor:
    """``lambda_j = max|x_j|^a / max|w_j|^(1-a)``, normalised to a geometric mean of one (the
    overall scale is arbitrary, and a centred vector keeps both sides in float16 range)."""
    smooth = act_abs_max.float().clamp(min=1e-5).pow(alpha) / weight_abs_max.float().clamp(min=1e-5).pow(1 - alpha)
    return smooth / smooth.log().mean().exp()


def svdquant_split(smoothed_weight: Tensor, rank: int, exact: bool = True) -> tuple[LowRank, Tensor]:
    """The 16-bit branch (top-r singular directions of the smoothed weight) and the residual
    that the low-bit format will hold. ``exact=False`` finds the directions by randomized
    subspace iteration, a tenth of the cost, for comparing many candidate smoothings."""
    if exact or rank == 0:
        branch = lorc(smoothed_weight, rank)
    else:
        _check_rank(smoothed_weight, rank)
        branch = _balanced(*randomized_svd(smoothed_weight.float(), rank))
    residual = smoothed_weight.float() - branch.matrix() if rank else smoothed_weight.float()
    return branch, residual


def randomized_svd(matrix: Tensor, rank: int, oversample: int = 8, iterations: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets by subspace iteration (Halko et al.) from a fixed seed, so
    that repeated runs give identical results."""
    width = min(rank + oversample, min(matrix.shape))
    probe = torch.randn(matrix.shape[1], width, generator=torch.Generator().manual_seed(0)).to(matrix)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def hessian_error(weights: Sequence[Tensor], parts: Sequence[SVDQuantPart], smooth: Tensor, hessian: Tensor | Sequence[Tensor]) -> float:
    """``sum ||(W - W') X||^2`` over the group from H, for 16-bit activations, where
    ``W' = (residual + B A) diag(1 / lambda)``."""
    effective = [(part.residual + part.branch.matrix()) / smooth for part in parts]
    return output_error_sum(list(weights), effective, hessian)


def sampled_error(weights: Sequence[Tensor], parts: Sequence[SVDQuantPart], smooth: Tensor, samples: Tensor,
                  act_format: ActFormat) -> float:
    """``sum ||W x - (residual q(x / lambda) + B A x / lambda)||^2`` over calibration samples
    [T, K], with the low-bit branch's input quantized per token as ``act_format``."""
    x = samples.float()
    smoothed = x / smooth
    # A static scale is calibrated on these very samples.
    scale = static_scale(smoothed.abs().amax(), act_format) if act_format.static else None
    quantized = fake_quantize_activations(smoothed, act_format, scale)
    total = 0.0
    for weight, part in zip(weights, parts, strict=True):
        approx = quantized @ part.residual.T + (smoothed @ part.branch.a.T) @ part.branch.b.T
        total += float((x @ weight.float().T - approx).square().sum())
    return total


def svdquant_parts(weights: Sequence[Tensor], formats: Sequence[QuantFormat], ranks: Sequence[int], smooth: Tensor,
                   exact: bool = True) -> list[SVDQuantPart]:
    """Each layer's split under ``smooth``, the residual rounded to nearest."""
    parts = []
    for weight, fmt, rank in zip(weights, formats, ranks, strict=True):
        branch, residual = svdquant_split(weight.float() * smooth, rank, exact)
        parts.append(SVDQuantPart(residual=dequantize(quantize(residual, fmt), fmt), branch=branch))
    return parts


def search_smoothing(weights: Sequence[Tensor], formats: Sequence[QuantFormat], ranks: Sequence[int], act_abs_max: Tensor,
                     error: Callable[[Sequence[Tensor], Sequence[SVDQuantPart], Tensor], float], grid: int = 20) -> SmoothSearch:
    """The exponent ``a`` (on a ``grid``-point grid in [0, 1)) whose smoothing gives the group
    the lowest ``error(weights, parts, smooth)`` (``hessian_error`` or ``sampled_error``)."""
    weight_abs_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    ones = torch.ones_like(weight_abs_max)
    unsmoothed = error(weights, svdquant_parts(weights, formats, ranks, ones, exact=False), ones)
    best = SmoothSearch(smooth=ones, alpha=None, error=unsmoothed, error_unsmoothed=unsmoothed)
    for step in range(grid):
        alpha = step / grid
        smooth = smoothing_vector(act_abs_max, weight_abs_max, alpha)
        candidate = error(weights, svdquant_parts(weights, formats, ranks, smooth, exact=False), smooth)
        if candidate < best.error:
            best = SmoothSearch(smooth=smooth, alpha=alpha, error=candidate, error_unsmoothed=unsmoothed)
    return best


def _check_rank(matrix: Tensor, rank: int) -> None:
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    if rank > min(matrix.shape):
        raise ValueError(f"rank {rank} exceeds min(N, K) = {min(matrix.shape)} of a {tuple(matrix.shape)} matrix")

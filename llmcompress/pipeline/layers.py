"""One quantization stage's layers, as tensors: the configured methods applied in order.

For each layer: (SVDQuant's split) -> (AWQ's clipping) -> GPTQ or RTN -> the low-rank branch
fitted to what is left. No module is touched here; the driver reads the weights and statistics
out of the block and installs the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import CompressConfig, QuantFormat
from ..formats import QuantizedWeight, dequantize, split_rows
from ..methods.awq import search_clipping
from ..methods.gptq import gptq
from ..methods.lowrank import LowRank, allocate_ranks, eigenbasis, eora, error_spectrum, lorc, svdquant_split
from ..methods.rtn import rtn
from .structure import Target


@dataclass
class LayerJob:
    """One layer going through the stage. ``weight`` and ``hessian`` are as the layer sees its
    inputs (after AWQ scaling or folded smoothing); ``smooth`` is SVDQuant's smoothing where it
    stays inside the layer (the layer then computes on ``x / smooth``)."""

    target: Target
    weight: Tensor
    hessian: Tensor | None
    smooth: Tensor | None = None

    @property
    def fmt(self) -> QuantFormat:
        return self.target.fmt


@dataclass
class LayerResult:
    quantized: QuantizedWeight
    branch: LowRank | None
    effective: Tensor  # the float32 weight the layer now computes with, on unsmoothed inputs
    method: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Working:
    """A job in the smoothed space: the weight to approximate, the part to quantize, and H."""

    target_weight: Tensor
    to_quantize: Tensor
    hessian: Tensor | None
    branch: LowRank | None = None


def compress_stage(jobs: list[LayerJob], config: CompressConfig) -> list[LayerResult]:
    """Quantize the stage's layers and fit their branches; results in the jobs' order."""
    smoothed_hessians: dict[tuple[int, int], Tensor] = {}
    working = [_working(job, config, smoothed_hessians) for job in jobs]
    quantized: list[QuantizedWeight | None] = [None] * len(jobs)
    methods = [""] * len(jobs)
    notes: list[list[str]] = [[] for _ in jobs]
    for batch in _batches(jobs, working, config):
        first = working[batch[0]]
        results, method, note = _quantize(jobs[batch[0]].fmt, [working[i].to_quantize for i in batch], first.hessian, config)
        for index, result in zip(batch, results, strict=True):
            quantized[index] = result
            methods[index] = method
            if note:
                notes[index].append(note)
    approximations = [dequantize(q, job.fmt) for q, job in zip(quantized, jobs, strict=True)]
    if config.wants_lowrank and not config.uses_svdquant:
        _fit_error_branches(jobs, working, approximations, config)
    results = []
    for job, work, q, approx, method, note in zip(jobs, working, quantized, approximations, methods, notes, strict=True):
        computed = approx + work.branch.matrix() if work.branch is not None and work.branch.rank else approx
        effective = computed / job.smooth if job.smooth is not None else computed
        results.append(LayerResult(quantized=q, branch=work.branch, effective=effective, method=method, notes=note))
    return results


def _working(job: LayerJob, config: CompressConfig, smoothed_hessians: dict[tuple[int, int], Tensor]) -> _Working:
    """``smoothed_hessians`` keeps one smoothed H per (H, smoothing) pair, so that layers that
    share both also share the result by identity."""
    weight, hessian = job.weight.float(), job.hessian
    if job.smooth is not None:
        weight = weight * job.smooth
        if hessian is not None:
            key = (id(hessian), id(job.smooth))
            if key not in smoothed_hessians:
                smoothed_hessians[key] = hessian / torch.outer(job.smooth, job.smooth)
            hessian = smoothed_hessians[key]
    if not config.uses_svdquant:
        return _Working(target_weight=weight, to_quantize=weight, hessian=hessian)
    branch, residual = svdquant_split(weight, job.target.rank)
    return _Working(target_weight=weight, to_quantize=residual, hessian=hessian, branch=branch)


def _batches(jobs: list[LayerJob], working: list[_Working], config: CompressConfig) -> list[list[int]]:
    """Consecutive layers GPTQ can quantize as one stacked matrix: same H (hence the same
    inverse and act-order permutation), same format, and no per-tensor global scale to keep
    apart. GPTQ treats rows independently, so stacking changes nothing but the column steps."""
    batches: list[list[int]] = []
    for index, job in enumerate(jobs):
        previous = batches[-1][-1] if batches else None
        joinable = (config.uses_gptq and previous is not None and job.fmt == jobs[previous].fmt and job.fmt.kind != "nvfp4"
                    and working[index].hessian is not None and working[index].hessian is working[previous].hessian)
        if joinable:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _quantize(fmt: QuantFormat, weights: list[Tensor], hessian: Tensor | None, config: CompressConfig) -> tuple[list[QuantizedWeight], str, str]:
    """(AWQ clipping), then GPTQ or RTN for weights sharing one H: (results, method, note)."""
    if hessian is None:
        fallback = "no calibration input reached this layer: RTN" if config.needs_calibration else ""
        return [rtn(w, fmt) for w in weights], "rtn", fallback
    if config.uses_awq and config.awq.clip:
        weights = [search_clipping(w, hessian, fmt, grid=config.awq.clip_grid, max_shrink=config.awq.max_shrink) for w in weights]
    if not config.uses_gptq:
        return [rtn(w, fmt) for w in weights], config.method, ""
    options = config.gptq
    result = gptq(torch.cat(weights), hessian, fmt, damp=options.damp, block_size=options.block_size,
                  act_order=options.act_order, static_groups=options.static_groups)
    notes = [f"damp raised to {result.damp:g}" if result.damp > options.damp else "",
             f"{result.dead_columns} dead input channels" if result.dead_columns else ""]
    return split_rows(result.quantized, [w.shape[0] for w in weights]), config.method, "; ".join(n for n in notes if n)


def _fit_error_branches(jobs: list[LayerJob], working: list[_Working], approximations: list[Tensor], config: CompressConfig) -> None:
    """LoRC or EoRA on each layer's remaining error, at the configured or allocated rank."""
    options = config.lowrank
    use_eora = options.method == "eora"
    bases: dict[int, object] = {}
    errors = [work.target_weight - approx for work, approx in zip(working, approximations, strict=True)]

    def basis(work: _Working):  # noqa: ANN202 - one eigendecomposition per distinct H
        if not use_eora or work.hessian is None:
            return None
        key = id(work.hessian)
        if key not in bases:
            bases[key] = eigenbasis(work.hessian, options.eora_damp)
        return bases[key]

    ranks = [job.target.rank for job in jobs]
    if options.alloc == "energy":
        names = [job.target.name for job in jobs]
        spectra, costs, limits = {}, {}, {}
        for name, job, work, error in zip(names, jobs, working, errors, strict=True):
            hessian = work.hessian if use_eora else None
            reference = float(((work.target_weight @ hessian) * work.target_weight).sum()) if hessian is not None else float(work.target_weight.square().sum())
            spectra[name] = error_spectrum(error, basis(work)) / max(reference, torch.finfo(torch.float32).tiny)
            costs[name] = sum(work.target_weight.shape)
            limits[name] = min(work.target_weight.shape)
        budget = sum(rank * costs[name] for rank, name in zip(ranks, names, strict=True))
        allocated = allocate_ranks(spectra, costs, budget, limits)
        ranks = [allocated[name] for name in names]
    for work, error, rank in zip(working, errors, ranks, strict=True):
        fitted_basis = basis(work)
        work.branch = eora(error, fitted_basis, rank) if fitted_basis is not None else lorc(error, rank)

"""One quantization stage's layers, as tensors: the configured methods applied in order.

For each layer: (SVDQuant's split) -> pruning -> AWQ's clipping and RTN, or GPTQ with its range search -> the
low-rank branch fitted to what is left (so it compensates pruning and quantization together).
Magnitude and Wanda fix a mask first; SparseGPT chooses its mask inside GPTQ's column loop,
quantizing in the same pass under GPTQ, or pruning alone before RTN. No module is touched
here; the driver reads the weights and statistics out of the block and installs the results.
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
from ..methods.prune import input_norms_from_hessian, magnitude_mask, wanda_mask
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
    def fmt(self) -> QuantFormat | None:
        return self.target.fmt


@dataclass
class LayerResult:
    quantized: QuantizedWeight | None  # None: the weight stays in 16 bits (pruning alone)
    branch: LowRank | None
    effective: Tensor  # the float32 weight the layer now computes with, on unsmoothed inputs
    method: str
    mask: Tensor | None = None  # pruning's mask, True where a weight is kept
    notes: list[str] = field(default_factory=list)


@dataclass
class _Compressed:
    """One layer after pruning and quantization: the codes (or None in 16 bits), the float32
    weight they represent, and the mask."""

    quantized: QuantizedWeight | None
    approximation: Tensor
    mask: Tensor | None


@dataclass
class _Working:
    """A job in the smoothed space: the weight to approximate, the part to quantize, and H."""

    target_weight: Tensor
    to_quantize: Tensor
    hessian: Tensor | None
    branch: LowRank | None = None


def compress_stage(jobs: list[LayerJob], config: CompressConfig) -> list[LayerResult]:
    """Prune and quantize the stage's layers and fit their branches; results in the jobs' order."""
    smoothed_hessians: dict[tuple[int, int], Tensor] = {}
    working = [_working(job, config, smoothed_hessians) for job in jobs]
    compressed: list[_Compressed | None] = [None] * len(jobs)
    methods = [""] * len(jobs)
    notes: list[list[str]] = [[] for _ in jobs]
    for batch in _batches(jobs, working, config):
        first = working[batch[0]]
        results, method, note = _compress(jobs[batch[0]].fmt, [working[i].to_quantize for i in batch], first.hessian, config)
        for index, result in zip(batch, results, strict=True):
            compressed[index] = result
            methods[index] = method
            if note:
                notes[index].append(note)
    approximations = [c.approximation for c in compressed]
    if config.wants_lowrank and not config.uses_svdquant:
        _fit_error_branches(jobs, working, approximations, config)
    results = []
    for job, work, c, method, note in zip(jobs, working, compressed, methods, notes, strict=True):
        approx = c.approximation
        computed = approx + work.branch.matrix() if work.branch is not None and work.branch.rank else approx
        effective = computed / job.smooth if job.smooth is not None else computed
        results.append(LayerResult(quantized=c.quantized, branch=work.branch, effective=effective, method=method, mask=c.mask, notes=note))
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
    """Consecutive layers GPTQ (or SparseGPT) can process as one stacked matrix: same H (hence
    the same inverse and act-order permutation), same format, and no per-tensor global scale to
    keep apart. The column loop treats rows independently, so stacking changes nothing but the
    column steps."""
    column_loop = config.uses_gptq or config.prune.method == "sparsegpt"
    batches: list[list[int]] = []
    for index, job in enumerate(jobs):
        previous = batches[-1][-1] if batches else None
        joinable = (column_loop and previous is not None and job.fmt == jobs[previous].fmt
                    and (job.fmt is None or job.fmt.kind != "nvfp4")
                    and working[index].hessian is not None and working[index].hessian is working[previous].hessian)
        if joinable:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _compress(fmt: QuantFormat | None, weights: list[Tensor], hessian: Tensor | None,
              config: CompressConfig) -> tuple[list[_Compressed], str, str]:
    """Pruning, then AWQ clipping and RTN, or GPTQ (with its range search), for weights sharing one H:
    (results, method, note)."""
    sizes = [w.shape[0] for w in weights]
    prune, options = config.prune, config.gptq
    notes = [_fallback_note(fmt, hessian, config)]
    sparsegpt = prune.method == "sparsegpt" and hessian is not None
    gptq_quantizes = config.uses_gptq and fmt is not None and hessian is not None
    masks: list[Tensor | None] = [None] * len(weights)
    if prune.enabled and not sparsegpt:
        masks = _fixed_masks(weights, hessian, config)
        weights = [w * m for w, m in zip(weights, masks, strict=True)]
    elif sparsegpt and not gptq_quantizes:
        # SparseGPT alone, in the input order of its paper; whatever quantizer follows sees the pruned weight.
        result = gptq(torch.cat(weights), hessian, None, damp=options.damp, block_size=options.block_size,
                      sparsity=prune.sparsity, n_m=prune.n_m)
        weights, masks = list(result.weight.split(sizes)), list(result.mask.split(sizes))
        notes.append(_damp_note(result.damp, options.damp))
    if fmt is None:
        return [_Compressed(None, w, m) for w, m in zip(weights, masks, strict=True)], "none", _joined(notes)
    if not gptq_quantizes:
        if hessian is not None and config.uses_awq and config.awq.clip:
            weights = [search_clipping(w, hessian, fmt, grid=config.awq.clip_grid, max_shrink=config.awq.max_shrink) for w in weights]
        method = "rtn" if hessian is None else config.method
        return [_rounded(rtn(w, fmt), fmt, m) for w, m in zip(weights, masks, strict=True)], method, _joined(notes)
    ranges = None
    if options.clip:
        ranges = torch.cat([search_clipping(w, hessian, fmt, grid=options.clip_grid, max_shrink=options.max_shrink) for w in weights])
    result = gptq(torch.cat(weights), hessian, fmt, damp=options.damp, block_size=options.block_size,
                  act_order=options.act_order, static_groups=options.static_groups,
                  mask=None if masks[0] is None else torch.cat(masks),
                  sparsity=prune.sparsity if sparsegpt else None, n_m=prune.n_m if sparsegpt else None, ranges=ranges)
    notes += [_damp_note(result.damp, options.damp), f"{result.dead_columns} dead input channels" if result.dead_columns else ""]
    if sparsegpt and prune.n_m is not None and options.act_order:
        notes.append("act-order off: SparseGPT's N:M runs follow the input order")
    masks = [None] * len(sizes) if result.mask is None else list(result.mask.split(sizes))
    compressed = [_rounded(q, fmt, m) for q, m in zip(split_rows(result.quantized, sizes), masks, strict=True)]
    return compressed, config.method, _joined(notes)


def _fixed_masks(weights: list[Tensor], hessian: Tensor | None, config: CompressConfig) -> list[Tensor]:
    """Masks chosen before any update: Wanda's where the layer saw calibration inputs, else by magnitude."""
    prune = config.prune
    if prune.method == "wanda" and hessian is not None:
        norms = input_norms_from_hessian(hessian)
        return [wanda_mask(w, norms, prune.sparsity, prune.n_m) for w in weights]
    return [magnitude_mask(w, prune.sparsity, prune.n_m) for w in weights]


def _fallback_note(fmt: QuantFormat | None, hessian: Tensor | None, config: CompressConfig) -> str:
    if hessian is not None or not config.needs_calibration:
        return ""
    done = [p for p in ("magnitude pruning" if config.prune.uses_calibration else "", "RTN" if fmt is not None else "") if p]
    return f"no calibration input reached this layer: {', '.join(done) or 'left as it was'}"


def _joined(notes: list[str]) -> str:
    return "; ".join(n for n in notes if n)


def _rounded(q: QuantizedWeight, fmt: QuantFormat, mask: Tensor | None) -> _Compressed:
    return _Compressed(q, dequantize(q, fmt), mask)


def _damp_note(used: float, asked: float) -> str:
    return f"damp raised to {used:g}" if used > asked else ""


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

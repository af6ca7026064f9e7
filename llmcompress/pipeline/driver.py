"""The block-wise driver.

1. Find the decoder blocks by structure, and the Linear layers the configuration targets.
2. Run the model on the calibration windows once, catching block 0's inputs (hidden states
   plus every keyword the block is called with: masks, position embeddings, position ids).
3. For each block, in order:
   a. AWQ or SVDQuant (if asked): statistics on the float block, a scale (AWQ) or smoothing
      (SVDQuant) search per group of layers that share an input, folded into the group's
      producer (SVDQuant keeps it inside the layers where no producer takes it);
   b. quantization stages: with GPTQ's true-sequential order, one stage per input group
      (q/k/v, then o, then gate/up, then down), each seeing the inputs produced by the layers
      already compressed; otherwise one stage. Each stage gathers its layers' Hessian and
      hands the tensors to ``layers.compress_stage`` (split, clip, quantize, fit the low-rank
      branch), then replaces each Linear by a ``CompressedLinear``;
   c. the block is run again on the compressed weights; its outputs are the next block's inputs.

Without calibration windows (data-free RTN, LoRC), step 2 and the re-runs are skipped.

With a ``BlockStream`` the model arrives with its blocks on the meta device: each block is read
when its turn comes and handed to the stream once compressed, which commits it to disk and
drops it, so memory holds one block whatever the depth. A stream may also resume a run: the
committed blocks are skipped and the activations entering the next one come from disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import CompressConfig
from ..errors import ModelError
from ..memory import forward_allocations
from ..methods.awq import search_scales
from ..methods.lowrank import hessian_error, sampled_error, search_smoothing
from ..nn import CompressedLinear, dequantized_weights
from ..stats import ABS_MAX, ABS_MEAN, HESSIAN, SAMPLES, LayerStats, output_error, weight_error
from .activations import Activations, choose_place
from .folding import Fold, apply_fold, find_fold
from .layers import LayerJob, LayerResult, compress_stage
from .placement import block_devices
from .runner import BlockInputs, catch_block_inputs, device_of, gather_statistics, run_block
from .structure import Target, find_decoder_blocks, input_groups, plan_targets


@dataclass
class LayerRecord:
    name: str
    format: str
    method: str
    out_features: int
    in_features: int
    weight_error: float
    output_error: float | None
    seconds: float
    rank: int = 0
    notes: str = ""
    sparsity: float = 0.0  # the fraction of the weight's entries pruning set to zero


@dataclass
class CompressionReport:
    """What a run did, layer by layer; saved beside the checkpoint."""

    blocks_path: str
    num_blocks: int
    calibration_tokens: int
    seconds: float = 0.0
    activations: str = "none"  # where the calibration activations between blocks were kept
    devices: list[str] = field(default_factory=list)  # where the blocks were compressed
    layers: list[LayerRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class BlockStream(Protocol):
    """Where blocks come from and go to when the model is not whole in memory."""

    def first_block(self) -> int:
        """Blocks before this one are already committed (a resumed run)."""

    def resumed_inputs(self, device: torch.device, place: str, offload_dir: Path | None) -> BlockInputs:
        """The calibration activations entering ``first_block``, when it is not 0, kept at ``place``."""

    def resumed_records(self) -> list[LayerRecord]: ...

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Read block ``index``'s tensors onto ``device``."""

    def commit(self, index: int, block: nn.Module, records: list[LayerRecord], next_inputs: BlockInputs | None) -> None:
        """Persist the compressed block (and the activations entering the next), then drop its tensors."""


def compress_blocks(model: nn.Module, config: CompressConfig, windows: Tensor | None, device: str | torch.device = "cpu",
                    progress: bool = True, stream: BlockStream | None = None, activations: str = "auto",
                    offload_dir: str | Path | None = None) -> CompressionReport:
    """Compress every targeted Linear of ``model`` in place, block by block, on ``device``
    ("auto": the blocks spread over the visible GPUs, see ``placement``).

    ``activations`` says where the calibration activations between blocks are kept: "auto"
    (on the device when they fit, else on the host, else in ``offload_dir``), "device",
    "host" or "disk" (files in ``offload_dir``)."""
    started = time.perf_counter()
    blocks_path, blocks = find_decoder_blocks(model)
    targets = plan_targets(blocks, blocks_path, config)
    devices = block_devices(blocks, device)
    report = CompressionReport(blocks_path=blocks_path, num_blocks=len(blocks),
                               calibration_tokens=0 if windows is None else windows.numel(),
                               devices=sorted({str(d) for d in devices}))
    start = 0 if stream is None else stream.first_block()
    if stream is not None:
        report.layers.extend(stream.resumed_records())
        if start == 0:
            stream.load(0, blocks[0], devices[0])  # catching its inputs calls it
    inputs = None
    if windows is not None:
        offload_dir = None if offload_dir is None else Path(offload_dir)
        embeddings = model.get_input_embeddings()
        hidden_bytes = windows.numel() * getattr(model.config, "hidden_size", embeddings.embedding_dim) * embeddings.weight.element_size()
        report.activations = choose_place(activations, hidden_bytes, devices[min(start, len(blocks) - 1)], offload_dir)
        if start == 0:
            store = Activations(devices[0], report.activations, offload_dir)
            inputs = catch_block_inputs(model, blocks, windows, config.calib.batch_size, devices[0], into=store)
        elif start < len(blocks):
            inputs = stream.resumed_inputs(devices[start], report.activations, offload_dir)
    folds: dict[tuple[str, ...], Fold | None] = {}
    passes = " + ".join(p for p in (config.prune.describe() if config.prune.enabled else "", config.method if config.quant else "") if p)
    bar = tqdm(range(start, len(blocks)), initial=start, total=len(blocks), desc=f"compressing blocks ({passes})", unit="block",
               disable=not progress)
    for index in bar:
        block = blocks[index]
        home = device_of(block)
        if stream is not None and home.type == "meta":
            stream.load(index, block, devices[index])
        block.to(devices[index])
        if inputs is not None:
            inputs.move_to(devices[index])
        block_targets = [t for t in targets if t.block == index]
        _check_finite(block, block_targets)
        records = _compress_block(block, block_targets, inputs, config, folds)
        report.layers.extend(records)
        if inputs is not None and index + 1 < len(blocks):
            with dequantized_weights(block, inputs.dtype), forward_allocations():
                inputs = run_block(block, inputs)
        if stream is not None:
            stream.commit(index, block, records, inputs if index + 1 < len(blocks) else None)
        else:
            block.to(home)
        if progress:
            bar.write(_block_line(index, len(blocks), records))
    report.seconds = time.perf_counter() - started
    return report


def _check_finite(block: nn.Module, targets: list[Target]) -> None:
    for target in targets:
        if not torch.isfinite(block.get_submodule(target.local_name).weight).all():
            raise ModelError(f"weight {target.name}.weight contains NaN or Inf: repair or re-export the model before compressing")


def _block_line(index: int, count: int, records: list[LayerRecord]) -> str:
    """One line per block: the mean and the worst relative error of its layers."""
    kind = "output" if records and records[0].output_error is not None else "weight"
    errors = {".".join(r.name.rsplit(".", 2)[-2:]): (r.output_error if kind == "output" else r.weight_error) for r in records}
    worst = max(errors, key=errors.get)
    return (f"block {index + 1}/{count}: mean relative {kind} error {sum(errors.values()) / len(errors):.4f}, "
            f"worst {worst} {errors[worst]:.4f}")


def _compress_block(block: nn.Module, targets: list[Target], inputs: BlockInputs | None, config: CompressConfig,
                    folds: dict[tuple[str, ...], Fold | None]) -> list[LayerRecord]:
    if inputs is None:
        return _compress_stage(block, targets, {}, config, {}, {})
    groups = input_groups(block, targets, inputs)
    smooths: dict[str, Tensor] = {}
    notes: dict[str, str] = {}
    if config.uses_awq:
        notes = _apply_awq_scales(block, targets, groups, inputs, config, folds)
    elif config.uses_svdquant:
        notes, smooths = _apply_smoothing(block, targets, groups, inputs, config, folds)
    # Layers that read the calibration inputs beyond H's diagonal sum (GPTQ, SparseGPT) or prune by
    # input norms (Wanda) see what the already-compressed layers before them produce.
    sequential = (config.uses_gptq or config.prune.uses_calibration) and config.gptq.true_sequential
    stages = groups if sequential else [[t for group in groups for t in group]]
    records = []
    for stage in stages:
        with dequantized_weights(block, inputs.dtype), forward_allocations():
            stats = gather_statistics(block, stage, inputs, frozenset({HESSIAN}), stop_after_last=True, one_input=sequential)
        records += _compress_stage(block, stage, stats, config, notes, smooths)
    return records


def _group_fold(block: nn.Module, group: list[Target], inputs: BlockInputs, folds: dict[tuple[str, ...], Fold | None]) -> Fold | None:
    """Where a per-channel scale of the group's input folds (found once, blocks are identical)."""
    key = tuple(t.local_name for t in group)
    if key not in folds:
        folds[key] = find_fold(block, group, inputs)
    return folds[key]


def _note_group(notes: dict[str, str], group: list[Target], text: str) -> None:
    notes.update(dict.fromkeys((t.name for t in group), text))


def _fold_into_producer(block: nn.Module, fold: Fold, linears: list[nn.Module], scales: Tensor) -> None:
    """Divide the producer's output by ``scales`` and multiply the layers' input columns by it:
    the float block computes the same function."""
    apply_fold(block, fold, scales)
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_((linear.weight.float() * scales.to(linear.weight.device)).to(linear.weight.dtype))


def _apply_awq_scales(block: nn.Module, targets: list[Target], groups: list[list[Target]], inputs: BlockInputs,
                      config: CompressConfig, folds: dict[tuple[str, ...], Fold | None]) -> dict[str, str]:
    """AWQ's scale search for each input group on the float block, folded where it can be."""
    stats = gather_statistics(block, targets, inputs, frozenset({HESSIAN, ABS_MEAN}))
    notes: dict[str, str] = {}
    for group in groups:
        layer_stats = stats.get(group[0].name)
        if layer_stats is None:
            _note_group(notes, group, "awq: no calibration input reached it")
            continue
        fold = _group_fold(block, group, inputs, folds)
        if fold is None:
            _note_group(notes, group, "awq: input has no foldable producer, not scaled")
            continue
        linears = [block.get_submodule(t.local_name) for t in group]
        search = search_scales([m.weight for m in linears], [t.fmt for t in group], layer_stats.hessian,
                               layer_stats.act_abs_mean, grid=config.awq.grid, duo_scaling=config.awq.duo_scaling)
        if search.alpha is None:
            _note_group(notes, group, "awq: s=1 was best")
            continue
        _fold_into_producer(block, fold, linears, search.scales)
        gain = search.error / search.error_unscaled if search.error_unscaled > 0 else 1.0
        _note_group(notes, group, f"awq: a={search.alpha:.2f} into {fold.module} ({fold.kind}), error x{gain:.3f}")
    return notes


def _apply_smoothing(block: nn.Module, targets: list[Target], groups: list[list[Target]], inputs: BlockInputs,
                     config: CompressConfig, folds: dict[tuple[str, ...], Fold | None]) -> tuple[dict[str, str], dict[str, Tensor]]:
    """SVDQuant's smoothing search for each input group on the float block. The smoothing is
    folded into the group's producer where it can be; otherwise it stays inside the layers
    (returned per layer name) and they compute on x / smooth."""
    act_formats = {config.act_format(t.fmt) for t in targets}
    wanted = {HESSIAN, ABS_MAX} | ({SAMPLES} if act_formats != {None} else set())
    stats = gather_statistics(block, targets, inputs, frozenset(wanted))
    notes: dict[str, str] = {}
    smooths: dict[str, Tensor] = {}
    for group in groups:
        layer_stats = stats.get(group[0].name)
        if layer_stats is None:
            _note_group(notes, group, "svdquant: no calibration input reached it, not smoothed")
            continue
        linears = [block.get_submodule(t.local_name) for t in group]
        act_format = config.act_format(group[0].fmt)
        if act_format is None:
            error = partial(hessian_error, hessian=layer_stats.hessian)
        else:
            error = partial(sampled_error, samples=layer_stats.samples, act_format=act_format)
        search = search_smoothing([m.weight.detach().float() for m in linears], [t.fmt for t in group], [t.rank for t in group],
                                  layer_stats.act_abs_max, error, grid=config.lowrank.smooth_grid)
        if search.alpha is None:
            _note_group(notes, group, "svdquant: lambda=1 was best")
            continue
        gain = search.error / search.error_unsmoothed if search.error_unsmoothed > 0 else 1.0
        fold = _group_fold(block, group, inputs, folds)
        if fold is None:
            smooths.update(dict.fromkeys((t.name for t in group), search.smooth))
            where = "kept in the layer (no foldable producer)"
        else:
            _fold_into_producer(block, fold, linears, search.smooth)
            where = f"into {fold.module} ({fold.kind})"
        _note_group(notes, group, f"svdquant: a={search.alpha:.2f} {where}, error x{gain:.3f}")
    return notes, smooths


def _compress_stage(block: nn.Module, stage: list[Target], stats: dict[str, LayerStats], config: CompressConfig,
                    notes: dict[str, str], smooths: dict[str, Tensor]) -> list[LayerRecord]:
    """Compress layers whose statistics are gathered, replace them with ``CompressedLinear``s, record them."""
    started = time.perf_counter()
    linears: list[nn.Linear] = [block.get_submodule(t.local_name) for t in stage]
    originals = [linear.weight.detach().float() for linear in linears]
    # One H tensor per shared accumulator: layers reading one input (q/k/v) then share it by
    # identity, which is how the stage stacks them for GPTQ and decomposes H once for EoRA.
    hessians: dict[int, Tensor] = {}
    for layer_stats in stats.values():
        if id(layer_stats) not in hessians:
            hessians[id(layer_stats)] = layer_stats.hessian
    jobs = [LayerJob(target=t, weight=w, hessian=hessians[id(stats[t.name])] if t.name in stats else None, smooth=smooths.get(t.name))
            for t, w in zip(stage, originals, strict=True)]
    results = compress_stage(jobs, config)
    seconds = (time.perf_counter() - started) / len(stage)
    records = []
    for job, linear, weight, result in zip(jobs, linears, originals, results, strict=True):
        target = job.target
        _install(block, target, linear, result, job.smooth, config)
        records.append(LayerRecord(
            name=target.name, format=target.fmt.describe() if target.fmt else "16-bit", method=result.method,
            out_features=linear.out_features, in_features=linear.in_features,
            weight_error=weight_error(weight, result.effective),
            output_error=None if job.hessian is None else output_error(weight, result.effective, job.hessian),
            seconds=seconds, rank=0 if result.branch is None else result.branch.rank,
            notes="; ".join(n for n in (notes.get(target.name, ""), *result.notes) if n),
            sparsity=0.0 if result.mask is None else 1 - float(result.mask.float().mean()),
        ))
    return records


def _install(block: nn.Module, target: Target, linear: nn.Linear, result: LayerResult, smooth: Tensor | None,
             config: CompressConfig) -> None:
    """Put the compressed layer in the block. An N:M mask is stored compact; an unstructured one
    stays dense (zeros in the codes, or in a plain Linear's 16-bit weight)."""
    compact = config.prune.pattern if config.prune.n_m is not None and result.mask is not None else None
    if result.quantized is None and compact is None:
        with torch.no_grad():
            linear.weight.copy_(result.effective.to(linear.weight.dtype))
        return
    if result.quantized is None:
        layer = CompressedLinear.from_pruned(result.effective.to(linear.weight.dtype), result.mask, compact, linear.bias)
    else:
        layer = CompressedLinear.from_quantized(result.quantized, target.fmt, linear.bias, branch=result.branch,
                                                lowrank_dtype=config.lowrank.dtype, smooth=smooth, act_format=config.act_format(target.fmt),
                                                sparsity=compact, mask=result.mask)
    parent_name, _, child_name = target.local_name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child_name, layer)

"""The block-wise driver.

1. Find the decoder blocks by structure, and the Linear layers the configuration targets.
2. Run the model on the calibration windows once, catching block 0's inputs (hidden states
   plus every keyword the block is called with: masks, position embeddings, position ids).
3. For each block, in order:
   a. AWQ (if asked): statistics on the float block, a scale search per group of layers that
      share an input, the scale folded into the group's producer;
   b. quantization stages: with GPTQ's true-sequential order, one stage per input group
      (q/k/v, then o, then gate/up, then down), each seeing the inputs produced by the layers
      already quantized; otherwise one stage. Each stage gathers its layers' Hessian, clips
      (AWQ) and quantizes (RTN or GPTQ), replacing each Linear by a ``CompressedLinear``;
   c. the block is run again on the compressed weights; its outputs are the next block's inputs.

Without calibration windows (data-free RTN), step 2 and the re-runs are skipped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import CompressConfig, QuantFormat
from ..formats import QuantizedWeight, dequantize, split_rows
from ..methods.awq import search_clipping, search_scales
from ..methods.gptq import gptq
from ..methods.rtn import rtn
from ..nn import CompressedLinear, dequantized_weights
from ..stats import ABS_MEAN, HESSIAN, LayerStats, output_error, weight_error
from .folding import Fold, apply_fold, find_fold
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
    notes: str = ""


@dataclass
class CompressionReport:
    """What a run did, layer by layer; saved beside the checkpoint."""

    blocks_path: str
    num_blocks: int
    calibration_tokens: int
    seconds: float = 0.0
    layers: list[LayerRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compress_blocks(model: nn.Module, config: CompressConfig, windows: Tensor | None, device: str | torch.device = "cpu",
                    progress: bool = True) -> CompressionReport:
    """Compress every targeted Linear of ``model`` in place, block by block."""
    device = torch.device(device)
    started = time.perf_counter()
    blocks_path, blocks = find_decoder_blocks(model)
    targets = plan_targets(blocks, blocks_path, config)
    report = CompressionReport(blocks_path=blocks_path, num_blocks=len(blocks),
                               calibration_tokens=0 if windows is None else windows.numel())
    inputs = None if windows is None else catch_block_inputs(model, blocks, windows, config.calib.batch_size, device)
    folds: dict[tuple[str, ...], Fold | None] = {}
    bar = tqdm(blocks, desc=f"compressing blocks ({config.method})", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        home = device_of(block)
        block.to(device)
        records = _compress_block(block, [t for t in targets if t.block == index], inputs, config, folds)
        report.layers.extend(records)
        if inputs is not None and index + 1 < len(blocks):
            with dequantized_weights(block, inputs[0][0].dtype):
                inputs = run_block(block, inputs)
        block.to(home)
        if progress:
            bar.write(_block_line(index, len(blocks), records))
    report.seconds = time.perf_counter() - started
    return report


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
        return [record for target in targets for record in _quantize_batch(block, [target], config, None, {})]
    groups = input_groups(block, targets, inputs)
    notes = _apply_awq_scales(block, targets, groups, inputs, config, folds) if config.uses_awq else {}
    sequential = config.uses_gptq and config.gptq.true_sequential
    stages = groups if sequential else [[t for group in groups for t in group]]
    records = []
    for stage in stages:
        stats = gather_statistics(block, stage, inputs, frozenset({HESSIAN}), stop_after_last=True)
        for batch in _batches(stage, stats, config):
            records += _quantize_batch(block, batch, config, stats.get(batch[0].name), notes)
    return records


def _batches(stage: list[Target], stats: dict[str, LayerStats], config: CompressConfig) -> list[list[Target]]:
    """Consecutive layers GPTQ can quantize as one stacked matrix: same inputs (hence the same H,
    inverse and act-order permutation), same format, and no per-tensor global scale to keep apart.
    GPTQ treats rows independently, so stacking changes nothing but the number of column steps."""
    batches: list[list[Target]] = []
    for target in stage:
        previous = batches[-1][-1] if batches else None
        joinable = (config.uses_gptq and previous is not None and target.fmt == previous.fmt and target.fmt.kind != "nvfp4"
                    and stats.get(target.name) is not None and stats.get(target.name) is stats.get(previous.name))
        if joinable:
            batches[-1].append(target)
        else:
            batches.append([target])
    return batches


def _apply_awq_scales(block: nn.Module, targets: list[Target], groups: list[list[Target]], inputs: BlockInputs,
                      config: CompressConfig, folds: dict[tuple[str, ...], Fold | None]) -> dict[str, str]:
    """AWQ's scale search for each input group on the float block, folded where it can be.

    Blocks are identical modules, so the fold found for a group in the first block is reused."""
    stats = gather_statistics(block, targets, inputs, frozenset({HESSIAN, ABS_MEAN}))
    notes: dict[str, str] = {}
    for group in groups:
        layer_stats = stats.get(group[0].name)
        if layer_stats is None:
            notes.update(dict.fromkeys((t.name for t in group), "awq: no calibration input reached it"))
            continue
        key = tuple(t.local_name for t in group)
        if key not in folds:
            folds[key] = find_fold(block, group, inputs)
        fold = folds[key]
        if fold is None:
            notes.update(dict.fromkeys((t.name for t in group), "awq: input has no foldable producer, not scaled"))
            continue
        linears = [block.get_submodule(t.local_name) for t in group]
        search = search_scales([m.weight for m in linears], [t.fmt for t in group], layer_stats.hessian,
                               layer_stats.act_abs_mean, grid=config.awq.grid, duo_scaling=config.awq.duo_scaling)
        if search.alpha is None:
            notes.update(dict.fromkeys((t.name for t in group), "awq: s=1 was best"))
            continue
        apply_fold(block, fold, search.scales)
        with torch.no_grad():
            for linear in linears:
                linear.weight.copy_((linear.weight.float() * search.scales.to(linear.weight.device)).to(linear.weight.dtype))
        gain = search.error / search.error_unscaled if search.error_unscaled > 0 else 1.0
        notes.update(dict.fromkeys((t.name for t in group), f"awq: a={search.alpha:.2f} into {fold.module} ({fold.kind}), error x{gain:.3f}"))
    return notes


def _quantize_batch(block: nn.Module, batch: list[Target], config: CompressConfig, stats: LayerStats | None,
                    notes: dict[str, str]) -> list[LayerRecord]:
    """Quantize layers that share their statistics, replace them with ``CompressedLinear``s, record them."""
    started = time.perf_counter()
    fmt = batch[0].fmt
    linears: list[nn.Linear] = [block.get_submodule(t.local_name) for t in batch]
    weights = [linear.weight.detach().float() for linear in linears]
    hessian = None if stats is None else stats.hessian
    quantized, method, extra = _quantize_weights(weights, fmt, config, hessian)
    seconds = (time.perf_counter() - started) / len(batch)
    records = []
    for target, linear, weight, q in zip(batch, linears, weights, quantized, strict=True):
        approx = dequantize(q, fmt)
        parent_name, _, child_name = target.local_name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child_name, CompressedLinear.from_quantized(q, fmt, linear.bias))
        records.append(LayerRecord(
            name=target.name, format=fmt.describe(), method=method,
            out_features=linear.out_features, in_features=linear.in_features,
            weight_error=weight_error(weight, approx),
            output_error=None if hessian is None else output_error(weight, approx, hessian),
            seconds=seconds, notes="; ".join(n for n in (notes.get(target.name, ""), extra) if n),
        ))
    return records


def _quantize_weights(weights: list[Tensor], fmt: QuantFormat, config: CompressConfig,
                      hessian: Tensor | None) -> tuple[list[QuantizedWeight], str, str]:
    """The quantizer for weights sharing one H: (AWQ clipping), then GPTQ or RTN.
    Returns (one result per weight, method, notes)."""
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

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

Blocks come from and go to a ``BlockStore``, the one thing that differs between a model in
memory and a model on disk: ``InMemoryBlocks`` reads each block where it is and returns it
there; the disk store (``llmcompress.streaming``) gets a model whose blocks are on the meta
device, reads each block when its turn comes and commits it to disk once compressed, so memory
holds one block whatever the depth. A disk store may also resume a run: the committed blocks are
skipped and the activations entering the next one come from disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import ModelError
from ..experts import set_expert_calibration
from ..surgery import standard_layers
from ..memory import forward_allocations
from ..nn import CompressedLinear
from ..precision import compute_dtype, forward_weights
from ..passes import LayerState, Pass, Target
from ..flags import RecipeLike, as_recipe
from ..recipe import Recipe
from ..stats import HESSIAN, GroupStats, LayerStats, output_error, weight_error
from .activations import Activations, choose_place
from .folding import Fold, apply_fold, compensate, find_fold, merge_expert_inputs
from .layers import layer_states, run_layer_passes
from .placement import block_devices
from .rotation import prepare_rotations
from .runner import BlockInputs, catch_block_inputs, device_of, gather_statistics, run_block
from .coverage import Coverage, plan_coverage
from .structure import find_decoder_blocks, input_groups, plan_layers, stages


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
    tokens: int | None = None  # calibration tokens that reached it (None: data-free run)
    fallback: bool = False  # an expert with too few calibration tokens, compressed data-free


@dataclass
class CompressionReport:
    """What a run did, layer by layer; saved beside the checkpoint."""

    blocks_path: str
    num_blocks: int
    calibration_tokens: int
    seconds: float = 0.0
    activations: str = "none"  # where the calibration activations between blocks were kept
    compute_dtype: str = "none"  # what the calibration forwards computed in
    devices: list[str] = field(default_factory=list)  # where the blocks were compressed
    layers: list[LayerRecord] = field(default_factory=list)
    coverage: Coverage | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class BlockStore(Protocol):
    """Where blocks come from and go to."""

    def first_block(self) -> int:
        """Blocks before this one are already committed (a resumed run)."""

    def resumed_inputs(self, device: torch.device, place: str, offload_dir: Path | None) -> BlockInputs:
        """The calibration activations entering ``first_block``, when it is not 0, kept at ``place``."""

    def resumed_records(self) -> list[LayerRecord]: ...

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Make block ``index``'s tensors available on ``device`` (called once per block)."""

    def commit(self, index: int, block: nn.Module, records: list[LayerRecord], next_inputs: BlockInputs | None) -> None:
        """Keep the compressed block (and the activations entering the next) wherever this store keeps them."""


class InMemoryBlocks:
    """The store of a model held whole in memory: each block is compressed on the run's device and
    goes back where it was."""

    def __init__(self) -> None:
        self.homes: dict[int, torch.device] = {}

    def first_block(self) -> int:
        return 0

    def resumed_inputs(self, device: torch.device, place: str, offload_dir: Path | None) -> BlockInputs:
        raise ModelError("a model in memory has no earlier run to resume")

    def resumed_records(self) -> list[LayerRecord]:
        return []

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self.homes[index] = device_of(block)
        block.to(device)

    def commit(self, index: int, block: nn.Module, records: list[LayerRecord], next_inputs: BlockInputs | None) -> None:
        block.to(self.homes.pop(index))


def compress_blocks(model: nn.Module, recipe: RecipeLike, windows: Tensor | None, device: str | torch.device = "cpu",
                    progress: bool = True, store: BlockStore | None = None, activations: str = "auto",
                    offload_dir: str | Path | None = None, strict: bool = False) -> CompressionReport:
    """Compress every targeted Linear of ``model`` in place, block by block, on ``device``
    ("auto": the blocks spread over the visible GPUs, see ``placement``), taking them from and
    handing them to ``store`` (default: ``InMemoryBlocks``).

    ``activations`` says where the calibration activations between blocks are kept: "auto"
    (on the device when they fit, else on the host, else in ``offload_dir``), "device",
    "host" or "disk" (files in ``offload_dir``). ``strict``: refuse to start when a weight would be
    left uncompressed for any reason but the recipe's (see ``coverage``)."""
    started = time.perf_counter()
    recipe = as_recipe(recipe)
    standard_layers(model)
    set_expert_calibration(model, recipe.calib.experts)
    blocks_path, blocks = find_decoder_blocks(model)
    targets, left = plan_layers(blocks, blocks_path, recipe)
    coverage = plan_coverage(model, blocks_path, blocks, targets, left)
    if strict:
        coverage.check_strict()
    passes = recipe.instantiate()
    devices = block_devices(blocks, device)
    rotations = prepare_rotations(model, blocks, [(p, recipe.passes[p.index].config) for p in passes if p.phase == "model"], devices[0])
    report = CompressionReport(blocks_path=blocks_path, num_blocks=len(blocks),
                               calibration_tokens=0 if windows is None else windows.numel(),
                               devices=sorted({str(d) for d in devices}), coverage=coverage)
    store = InMemoryBlocks() if store is None else store
    start = store.first_block()
    report.layers.extend(store.resumed_records())
    inputs = None
    preloaded = None  # a block loaded before the loop: catching block 0's inputs calls it
    if windows is not None:
        offload_dir = None if offload_dir is None else Path(offload_dir)
        embeddings = model.get_input_embeddings()
        dtype = compute_dtype(embeddings.weight.dtype, devices[min(start, len(blocks) - 1)], recipe.calib.compute_dtype)
        report.compute_dtype = str(dtype).replace("torch.", "")
        hidden_bytes = windows.numel() * getattr(model.config, "hidden_size", embeddings.embedding_dim) * dtype.itemsize
        report.activations = choose_place(activations, hidden_bytes, devices[min(start, len(blocks) - 1)], offload_dir)
        if start == 0:
            store.load(0, blocks[0], devices[0])
            preloaded = 0
            caught = Activations(devices[0], report.activations, offload_dir)
            inputs = catch_block_inputs(model, blocks, windows, recipe.calib.batch_size, devices[0], into=caught, dtype=dtype)
        elif start < len(blocks):
            inputs = store.resumed_inputs(devices[start], report.activations, offload_dir)
    folds: dict[tuple[str, ...], Fold | None] = {}
    bar = tqdm(range(start, len(blocks)), initial=start, total=len(blocks), desc=f"compressing blocks ({recipe.describe()})", unit="block",
               disable=not progress)
    for index in bar:
        block = blocks[index]
        if index != preloaded:
            store.load(index, block, devices[index])
        if inputs is not None:
            inputs.move_to(devices[index])
        block_targets = [t for t in targets if t.block == index]
        _check_finite(block, block_targets)
        for rotation in rotations:
            rotation.block(index, block, f"{blocks_path}.{index}", block_targets)
        records = _compress_block(block, block_targets, inputs, recipe, passes, folds)
        report.layers.extend(records)
        if inputs is not None and index + 1 < len(blocks):
            with forward_weights(block, inputs.dtype), forward_allocations():
                inputs = run_block(block, inputs, f"{blocks_path}.{index}")
        store.commit(index, block, records, inputs if index + 1 < len(blocks) else None)
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
    if not records:
        return f"block {index + 1}/{count}: nothing to compress"
    kind = "output" if records[0].output_error is not None else "weight"
    # An expert too starved for statistics has no output error.
    errors = {".".join(r.name.rsplit(".", 2)[-2:]): error for r in records
              if (error := r.output_error if kind == "output" else r.weight_error) is not None}
    worst = max(errors, key=errors.get)
    return (f"block {index + 1}/{count}: mean relative {kind} error {sum(errors.values()) / len(errors):.4f}, "
            f"worst {worst} {errors[worst]:.4f}")


def _compress_block(block: nn.Module, targets: list[Target], inputs: BlockInputs | None, recipe: Recipe, passes: list[Pass],
                    folds: dict[tuple[str, ...], Fold | None]) -> list[LayerRecord]:
    layer_passes = [p for p in passes if p.phase == "layer"]
    if not targets:
        return []
    if inputs is None:
        return _compress_stage(block, targets, {}, layer_passes, {}, {}, {})
    with forward_weights(block, inputs.dtype):
        groups = _first_process_groups(block, targets, inputs)
    notes: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}  # the block passes that ran on each layer, for its record
    smooths: dict[str, Tensor] = {}
    block_passes = [p for p in passes if p.phase == "block"]
    if block_passes:
        with forward_weights(block, inputs.dtype):
            smoothing_groups = _first_process_merged(block, groups, inputs)
    for block_pass in block_passes:
        _smooth_groups(block, block_pass, targets, smoothing_groups, inputs, folds, notes, labels, smooths)
    # Layers that read the calibration inputs beyond H's diagonal sum (GPTQ, SparseGPT) or prune by
    # input norms (Wanda) see what the already-compressed layers before them produce.
    sequential = recipe.sequential
    work = stages(groups) if sequential else [([t for group in groups for t in group], False)]
    wanted = frozenset({HESSIAN}).union(*(c.statistics() for t in targets for c in t.configs if c is not None))
    records = []
    for stage, one_input in work:
        with forward_weights(block, inputs.dtype), forward_allocations():
            # Stopping after the last layer is unsafe where experts are: each micro-batch reaches others.
            early = one_input or not (sequential or any(t.expert is not None for t in stage))
            stats = gather_statistics(block, stage, inputs, wanted, stop_after_last=early, one_input=one_input)
        tokens = {name: layer_stats.tokens for name, layer_stats in stats.items()}
        fallbacks = _drop_starved_experts(stage, stats, recipe.calib.expert_min_tokens, notes)
        records += _compress_stage(block, stage, stats, layer_passes, notes, labels, smooths, tokens, fallbacks)
        # Otherwise this stage's statistics (every expert's gate/up H) live on while the next stage's are gathered.
        del stats
    return records


def _first_process_groups(block: nn.Module, targets: list[Target], inputs: BlockInputs) -> list[list[Target]]:
    """``input_groups`` found on the first micro-batch, which the first process holds."""
    return _groups_from_first(lambda: input_groups(block, targets, inputs), targets)


def _first_process_merged(block: nn.Module, groups: list[list[Target]], inputs: BlockInputs) -> list[list[Target]]:
    """``merge_expert_inputs`` of ``groups``, found on the first micro-batch, which the first process holds."""
    return _groups_from_first(lambda: merge_expert_inputs(block, groups, inputs), [t for group in groups for t in group])


def _groups_from_first(find: Callable[[], list[list[Target]]], targets: list[Target]) -> list[list[Target]]:
    """The groups the first process finds, as every process's own targets (sent by name)."""
    named = distributed.from_first(lambda: [[t.name for t in group] for group in find()])
    by_name = {t.name: t for t in targets}
    return [[by_name[name] for name in group] for group in named]


def _drop_starved_experts(stage: list[Target], stats: dict[str, LayerStats], min_tokens: int, notes: dict[str, list[str]]) -> set[str]:
    """Experts that saw fewer than ``min_tokens`` calibration tokens lose their statistics, so
    every pass compresses them data-free and says so; returns their names."""
    starved = set()
    for target in stage:
        if target.expert is None:
            continue
        seen = stats[target.name].tokens if target.name in stats else 0
        if seen < min_tokens:
            stats.pop(target.name, None)
            starved.add(target.name)
            notes.setdefault(target.name, []).append(f"expert saw {seen} calibration tokens (< expert_min_tokens={min_tokens}): data-free")
    return starved


def _group_fold(block: nn.Module, group: list[Target], inputs: BlockInputs, folds: dict[tuple[str, ...], Fold | None]) -> Fold | None:
    """Where a per-channel scale of the group's input folds (found once, blocks are identical)."""
    key = tuple(t.local_name for t in group)
    if key not in folds:
        with forward_weights(block, inputs.dtype):
            folds[key] = distributed.from_first(lambda: find_fold(block, group, inputs))
    return folds[key]


def _fold_into_producer(block: nn.Module, fold: Fold, group: list[Target], scales: Tensor) -> None:
    """Divide the producer's output by ``scales`` and multiply the input columns of the group's
    layers and the fold's readers (a router) by it: the float block computes the same function."""
    apply_fold(block, fold, scales)
    compensate(block, [*(t.local_name for t in group), *fold.readers], scales)


def _smooth_groups(block: nn.Module, block_pass: Pass, targets: list[Target], groups: list[list[Target]], inputs: BlockInputs,
                   folds: dict[tuple[str, ...], Fold | None], notes: dict[str, list[str]], labels: dict[str, list[str]],
                   smooths: dict[str, Tensor]) -> None:
    """A block pass's search for each input group on the float block. The scale is folded into the
    group's producer where it can be; otherwise it stays inside the layers (they then compute on
    x / s) if the pass allows that, or is not applied."""
    members = [t for t in targets if t.config(block_pass.index) is not None]
    if not members:
        return
    with forward_weights(block, inputs.dtype), forward_allocations():
        stats = gather_statistics(block, members, inputs, block_pass.block_statistics(members))
    for group in groups:
        chosen = [t for t in group if t.config(block_pass.index) is not None]
        if not chosen:
            continue
        config = chosen[0].config(block_pass.index)
        label = config.label()

        def note(text: str, chosen: list[Target] = chosen) -> None:
            for target in chosen:
                notes.setdefault(target.name, []).append(text)

        for target in chosen:
            labels.setdefault(target.name, []).append(label)
        if len(chosen) < len(group):
            note(f"{label}: not applied, its input also feeds layers this pass skips")
            continue
        # Experts that no calibration token reached take the scale all the same, but do not choose it.
        measured = [t for t in group if t.name in stats]
        if not measured:
            note(f"{label}: no calibration input reached it")
            continue
        fold = _group_fold(block, group, inputs, folds)
        if fold is None and not config.keeps_unfoldable:
            note(f"{label}: input has no foldable producer, not scaled")
            continue
        group_stats = stats[measured[0].name] if len({id(stats[t.name]) for t in measured}) == 1 else GroupStats([stats[t.name] for t in measured])
        found = block_pass.search([block.get_submodule(t.local_name).weight for t in measured], measured, config, group_stats)
        if found.scales is None:
            note(f"{label}: leaving the input as it is was best")
            continue
        if fold is None:
            smooths.update(dict.fromkeys((t.name for t in group), found.scales))
            where = "kept in the layer (no foldable producer)"
        else:
            _fold_into_producer(block, fold, group, found.scales)
            readers = f", {' and '.join(fold.readers)} compensated" if fold.readers else ""
            where = f"into {fold.module} ({fold.kind}{readers})"
        note(f"{label}: a={found.alpha:.2f} {where}, error x{found.gain:.3f}")


def _compress_stage(block: nn.Module, stage: list[Target], stats: dict[str, LayerStats], layer_passes: list[Pass],
                    notes: dict[str, list[str]], labels: dict[str, list[str]], smooths: dict[str, Tensor],
                    tokens: dict[str, int] | None = None, fallbacks: set[str] = frozenset()) -> list[LayerRecord]:
    """Run the layer passes on layers whose statistics are gathered, replace them with
    ``CompressedLinear``s, record them."""
    records = []
    for piece in _pieces(stage, stats, layer_passes):
        # Layers reading one input (q/k/v) share one statistics record, so their H is one tensor.
        hessians = _shared_hessians({t.name: stats[t.name] for t in piece if t.name in stats})
        maxima = {t.name: stats[t.name].act_abs_max for t in piece if t.name in stats and stats[t.name].abs_max is not None}
        records += _compress_piece(block, piece, hessians, layer_passes, notes, labels, smooths, tokens, fallbacks, maxima)
    return records


def _pieces(stage: list[Target], stats: dict[str, LayerStats], layer_passes: list[Pass]) -> list[list[Target]]:
    """The stage in the pieces compressed one after another, so that only one piece's working
    copies (H, float32 weights, approximations, codes) are alive at a time, not those of the whole
    stage (every expert of a block): each group of layers sharing one statistics record, where
    every pass compresses such groups independently and one process does all the work; else the
    whole stage."""
    if distributed.active() or not all(p.layers_independent([t.config(p.index) for t in stage]) for p in layer_passes):
        return [stage]
    pieces: list[list[Target]] = []
    for target in stage:
        record = stats.get(target.name)
        if pieces and record is not None and record is stats.get(pieces[-1][-1].name):
            pieces[-1].append(target)
        else:
            pieces.append([target])
    return pieces


def _compress_piece(block: nn.Module, piece: list[Target], hessians: dict[str, Tensor], layer_passes: list[Pass],
                    notes: dict[str, list[str]], labels: dict[str, list[str]], smooths: dict[str, Tensor],
                    tokens: dict[str, int] | None, fallbacks: set[str], maxima: dict[str, Tensor]) -> list[LayerRecord]:
    started = time.perf_counter()
    linears: list[nn.Linear] = [block.get_submodule(t.local_name) for t in piece]
    originals = [linear.weight.detach().float() for linear in linears]
    states = layer_states(piece, originals, [hessians.get(t.name) for t in piece], [smooths.get(t.name) for t in piece],
                          [maxima.get(t.name) for t in piece])
    distributed.split_layer_work(states, layer_passes, run_layer_passes)
    seconds = (time.perf_counter() - started) / len(piece)
    records = []
    for state, linear in zip(states, linears, strict=True):
        target = state.target
        effective = state.computed_weight()
        _install(block, state, linear, effective)
        records.append(LayerRecord(
            name=target.name, format=target.fmt.describe() if target.fmt else "16-bit", method="+".join((*labels.get(target.name, ()), *state.methods)) or "none",
            out_features=linear.out_features, in_features=linear.in_features,
            weight_error=weight_error(state.original, effective),
            output_error=None if target.name not in hessians else output_error(state.original, effective, hessians[target.name]),
            seconds=seconds, rank=0 if state.branch is None else state.branch.rank,
            notes="; ".join((*target.notes, *notes.get(target.name, ()), *state.notes)),
            sparsity=0.0 if state.mask is None else 1 - float(state.mask.float().mean()),
            tokens=None if tokens is None else tokens.get(target.name, 0), fallback=target.name in fallbacks,
        ))
    return records


def _shared_hessians(stats: dict[str, LayerStats]) -> dict[str, Tensor]:
    """Each layer's H, computed once per statistics record, so layers that read one input share
    one tensor object."""
    computed: list[tuple[LayerStats, Tensor]] = []
    hessians = {}
    for name, layer_stats in stats.items():
        hessian = next((h for known, h in computed if known is layer_stats), None)
        if hessian is None:
            hessian = layer_stats.hessian
            computed.append((layer_stats, hessian))
        hessians[name] = hessian
    return hessians


def _install(block: nn.Module, state: LayerState, linear: nn.Linear, effective: Tensor) -> None:
    """Put the compressed layer in the block. An N:M mask is stored compact; an unstructured one
    stays dense (zeros in the codes, or in a plain Linear's 16-bit weight)."""
    compact = state.compact_pattern if state.mask is not None else None
    if state.quantized is None and compact is None:
        with torch.no_grad():
            linear.weight.copy_(effective.to(linear.weight.dtype))
        return
    target = state.target
    if state.quantized is None:
        layer = CompressedLinear.from_pruned(effective.to(linear.weight.dtype), state.mask, compact, linear.bias)
    else:
        transform = getattr(linear, "input_transform", None)  # an online rotation (``rotation.attach_online``)
        layer = CompressedLinear.from_quantized(state.quantized, target.fmt, linear.bias, branch=state.branch,
                                                lowrank_dtype=state.branch_dtype, smooth=state.smooth, act_format=target.act_format,
                                                sparsity=compact, mask=state.mask,
                                                input_hadamard=0 if transform is None else transform.block_size or transform.n,
                                                act_scale=state.act_scale)
    parent_name, _, child_name = target.local_name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child_name, layer)

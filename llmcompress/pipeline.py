"""The block-wise driver: the only place that walks a model.

1. Find the decoder blocks by structure (the longest list of identical modules holding Linear
   layers), not by a list of architecture names.
2. Run the model on the calibration windows once, catching block 0's inputs (hidden states
   plus every keyword the block is called with: masks, position embeddings, position ids).
3. For each block: hooks gather the statistics its passes need, each Linear is compressed by a
   pure function from ``methods``, and the block is run again on the compressed weights so
   that the next block sees the errors of this one.

Without calibration windows (data-free methods), step 2 and the re-runs are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import PER_CHANNEL, CompressConfig, QuantFormat
from .errors import ConfigError, ModelError
from .formats import QuantizedWeight, dequantize
from .methods.rtn import rtn
from .nn import CompressedLinear
from .stats import HESSIAN, LayerStats, output_error, weight_error

BlockInputs = list[tuple[Tensor, dict]]


@dataclass(frozen=True)
class Target:
    """One Linear layer the configuration compresses."""

    name: str
    block: int
    local_name: str
    fmt: QuantFormat


@dataclass
class LayerRecord:
    name: str
    format: str
    out_features: int
    in_features: int
    weight_error: float
    output_error: float | None
    seconds: float


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


# ----------------------------------------------------------------------------- structure


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks, found by shape rather than by architecture name."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        has_linear = all(any(isinstance(m, (nn.Linear, CompressedLinear)) for m in child.modules()) for child in module)
        if len(kinds) == 1 and has_linear:
            candidates.append((len(module) == expected, len(module), name, module))
    if not candidates:
        layer_kinds = sorted({type(m).__name__ for m in model.modules()
                              if "conv1d" in type(m).__name__.lower() or ("linear" in type(m).__name__.lower() and not isinstance(m, nn.Linear))})
        found = f" (its projection layers are {', '.join(layer_kinds)}, not torch.nn.Linear)" if layer_kinds else ""
        raise ModelError(
            f"cannot map {type(model).__name__} onto the block-wise pipeline: looked for a torch.nn.ModuleList of "
            f"identical decoder blocks containing torch.nn.Linear layers and found none{found}. "
            "Supported models are decoder-only causal LMs built from nn.Linear (Llama, Mistral, Qwen2, Gemma, OPT, ...)"
        )
    _, _, name, module = max(candidates, key=lambda c: (c[0], c[1]))
    return name, module


def plan_targets(blocks: nn.ModuleList, blocks_path: str, config: CompressConfig) -> list[Target]:
    """Every Linear inside the blocks with the format it gets; checks what would fail later."""
    targets = []
    for index, block in enumerate(blocks):
        for local_name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{blocks_path}.{index}.{local_name}"
            fmt = config.format_for(name)
            if fmt is None:
                continue
            if not torch.isfinite(module.weight).all():
                raise ModelError(f"weight {name}.weight contains NaN or Inf: repair or re-export the model before compressing")
            if fmt.group_size != PER_CHANNEL and fmt.group_size > module.in_features and not fmt.is_fp4:
                raise ConfigError(
                    f"group_size={fmt.group_size} is larger than {name}'s {module.in_features} input features: "
                    f"use a smaller group, -1 (per channel), or an override for this module"
                )
            targets.append(Target(name=name, block=index, local_name=local_name, fmt=fmt))
    if not targets:
        raise ConfigError("the configuration leaves no Linear layer to compress: check the overrides' patterns")
    return targets


# ----------------------------------------------------------------------------- running blocks


class _BlockInputsCaught(Exception):
    """Raised by the hook on block 0 to stop the forward pass once its inputs are known."""


def catch_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    """Run the model up to block 0 on each micro-batch and keep what block 0 was called with.

    Everything outside the blocks visits ``device`` for this and returns where it was."""
    caught: BlockInputs = []
    home = _device_of(model)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        caught.append((hidden.detach(), kwargs))
        raise _BlockInputsCaught

    _move_outside_blocks(model, blocks, device)
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _BlockInputsCaught:
                    continue
                raise ModelError(f"{type(model).__name__}'s forward never called its first decoder block: the model cannot be compressed block by block")
    finally:
        handle.remove()
        blocks[0].to(home)
        _move_outside_blocks(model, blocks, home)
    return caught


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for each micro-batch, paired with the same keywords."""
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in inputs:
            out = block(hidden, **kwargs)
            outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def gather_statistics(block: nn.Module, targets: Iterable[Target], inputs: BlockInputs, wanted: frozenset[str]) -> dict[str, LayerStats]:
    """Run the block with hooks on its target Linears and accumulate their input statistics.

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so X^T X is
    computed once per distinct input.
    """
    stats: dict[str, LayerStats] = {}
    seen: list[tuple[Tensor, LayerStats]] = []  # holding the tensors also keeps their identity unique
    updated: set[int] = set()

    def make_hook(target: Target, in_features: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            if target.name not in stats:
                shared = next((acc for tensor, acc in seen if tensor is x), None)
                stats[target.name] = shared if shared is not None else LayerStats(in_features, wanted)
            accumulator = stats[target.name]
            if not any(tensor is x for tensor, _ in seen):
                seen.append((x, accumulator))
            if id(accumulator) not in updated:
                accumulator.update(x)
                updated.add(id(accumulator))

        return hook

    handles = []
    for target in targets:
        linear = block.get_submodule(target.local_name)
        handles.append(linear.register_forward_hook(make_hook(target, linear.in_features)))
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                seen.clear()
                updated.clear()
                block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    return stats


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer not inside ``blocks`` (embeddings, norms, rotary tables)."""
    inside = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
    moved: dict[int, Tensor] = {}  # keeps tied weights tied
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or id(tensor) in inside or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
                store[key] = moved[id(tensor)]


# ----------------------------------------------------------------------------- compression


def compress_weight(weight: Tensor, fmt: QuantFormat, config: CompressConfig) -> QuantizedWeight:
    """The passes applied to one weight matrix, in the fixed order of DESIGN.md."""
    return rtn(weight, fmt)


def statistics_wanted(config: CompressConfig, calibrated: bool) -> frozenset[str]:
    # With calibration the Hessian also measures each layer's output error for the report.
    return frozenset({HESSIAN}) if calibrated else frozenset()


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
    wanted = statistics_wanted(config, windows is not None)
    bar = tqdm(blocks, desc="compressing blocks", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        home = _device_of(block)
        block.to(device)
        block_targets = [t for t in targets if t.block == index]
        stats = gather_statistics(block, block_targets, inputs, wanted) if inputs is not None and wanted else {}
        for target in block_targets:
            report.layers.append(_compress_target(block, target, config, stats.get(target.name)))
        if inputs is not None and index + 1 < len(blocks):
            inputs = run_block(block, inputs)
        block.to(home)
        errors = [r.output_error if r.output_error is not None else r.weight_error for r in report.layers[-len(block_targets):]]
        bar.set_postfix(mean_rel_error=f"{sum(errors) / max(len(errors), 1):.4f}")
    report.seconds = time.perf_counter() - started
    return report


def _compress_target(block: nn.Module, target: Target, config: CompressConfig, stats: LayerStats | None) -> LayerRecord:
    started = time.perf_counter()
    parent_name, _, child_name = target.local_name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    linear: nn.Linear = getattr(parent, child_name)
    weight = linear.weight.detach().float()
    quantized = compress_weight(weight, target.fmt, config)
    approx = dequantize(quantized, target.fmt)
    compressed = CompressedLinear.from_quantized(quantized, target.fmt, linear.bias)
    setattr(parent, child_name, compressed)
    return LayerRecord(
        name=target.name,
        format=target.fmt.describe(),
        out_features=linear.out_features,
        in_features=linear.in_features,
        weight_error=weight_error(weight, approx),
        output_error=None if stats is None else output_error(weight, approx, stats.hessian),
        seconds=time.perf_counter() - started,
    )

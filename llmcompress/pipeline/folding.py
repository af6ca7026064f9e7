"""Folding a per-input-channel scale 1/s into whatever produces a group of layers' input.

Rather than a table of architectures, the producer is found by experiment on a calibration
micro-batch: candidates are the modules whose output *is* the group's input tensor (a norm, or
a linear) and the earlier linears of the right width (up_proj before down_proj, v_proj before
o_proj). Each candidate is scaled with random factors, and it is kept only if the group's input
really becomes x / s. A norm may be parametrised as ``w * x̂`` or ``(1 + w) * x̂`` (Gemma); both
are tried. Where nothing passes (o_proj under grouped-query attention), no scale is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .runner import BlockInputs, call_block
from ..passes import Target

FoldKind = Literal["rows", "scale", "one_plus"]
# float16 blocks reproduce x / s to about 1e-3; a wrong candidate misses by orders of magnitude more.
_FOLD_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Fold:
    """Where a group's input comes from: a module (local name) and how to divide its output by s."""

    module: str
    kind: FoldKind


def apply_fold(block: nn.Module, fold: Fold, scales: Tensor) -> None:
    """Divide the producer's output channels by ``scales`` (in place, in the producer's dtype)."""
    module = block.get_submodule(fold.module)
    weight = module.weight
    scales = scales.to(weight.device, torch.float32)
    with torch.no_grad():
        if fold.kind == "rows":
            new = weight.float() / scales.unsqueeze(1)
        elif fold.kind == "scale":
            new = weight.float() / scales
        else:
            new = (1 + weight.float()) / scales - 1
        weight.copy_(new.to(weight.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((bias.float() / scales).to(bias.dtype))


def find_fold(block: nn.Module, group: list[Target], sample: BlockInputs) -> Fold | None:
    """The producer of the group's input into which a per-channel 1/s folds exactly, if any."""
    first = group[0]
    in_features = block.get_submodule(first.local_name).in_features
    completed, reference = _trace(block, first, sample)
    members = {t.local_name for t in group}
    candidates: list[Fold] = []
    for name, output in completed:
        module = block.get_submodule(name)
        if output is reference:
            if isinstance(module, nn.Linear):
                candidates.append(Fold(name, "rows"))
            elif isinstance(getattr(module, "weight", None), Tensor) and module.weight.shape == (in_features,):
                candidates += [Fold(name, "scale"), Fold(name, "one_plus")]
    for name, _ in completed:
        module = block.get_submodule(name)
        if isinstance(module, nn.Linear) and module.out_features == in_features and name not in members:
            candidates.append(Fold(name, "rows"))
    probe = torch.empty(in_features).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    for fold in candidates:
        if _folds_exactly(block, fold, first, sample, reference, probe):
            return fold
    return None


def _trace(block: nn.Module, first: Target, sample: BlockInputs) -> tuple[list[tuple[str, Tensor]], Tensor]:
    """Modules completed before the group's first layer (with their outputs), and its input."""
    completed: list[tuple[str, Tensor]] = []
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in block.named_modules():
        if not name:
            continue
        if name == first.local_name:
            def capture(m: nn.Module, args: tuple, output: Tensor) -> None:
                captured.setdefault("input", args[0])
            handles.append(module.register_forward_hook(capture))
        else:
            def record(m: nn.Module, args: tuple, output: Tensor, name: str = name) -> None:
                if "input" not in captured and isinstance(output, Tensor):
                    completed.append((name, output))
            handles.append(module.register_forward_hook(record))
    try:
        call_block(block, sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    return completed, captured["input"]


def _folds_exactly(block: nn.Module, fold: Fold, first: Target, sample: BlockInputs, reference: Tensor, probe: Tensor) -> bool:
    module = block.get_submodule(fold.module)
    saved = {name: tensor.detach().clone() for name, tensor in module.named_parameters(recurse=False)}
    try:
        apply_fold(block, fold, probe)
        _, scaled = _trace(block, first, sample)
    finally:
        with torch.no_grad():
            for name, tensor in module.named_parameters(recurse=False):
                tensor.copy_(saved[name])
    restored = scaled.float() * probe.to(scaled.device)
    error = (restored - reference.float()).norm() / reference.float().norm().clamp(min=1e-12)
    return bool(error < _FOLD_TOLERANCE)

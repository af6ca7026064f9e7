"""Folding a per-input-channel scale 1/s into whatever produces a group of layers' input.

Rather than a table of architectures, the producer is found by experiment on a calibration
micro-batch: candidates are the modules whose output *is* the group's input tensor (a norm, or
a linear) and the earlier linears of the right width (up_proj before down_proj, v_proj before
o_proj). Each candidate is scaled with random factors, the group's weight columns (and those of
every other module reading the same tensor: a router) multiplied by them, and it is kept only if
the block still computes what it did. A norm may be parametrised as ``w * x̂`` or ``(1 + w) * x̂``
(Gemma); both are tried. Where nothing passes (o_proj under grouped-query attention), no scale is
applied.

Experts read the rows of the mixture-of-experts module's input routed to them, never that tensor
itself, so no producer folds one expert's scale. ``merge_expert_inputs`` makes the first
projections of all experts of one module (and its shared experts, which read its input whole)
one group, whose input is the module's: one scale for them all folds into the norm before it,
the router's columns taking the scale too so that every token is routed as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .runner import BlockInputs, call_block
from ..passes import Target

FoldKind = Literal["rows", "scale", "one_plus"]
# How much of the change that dividing the producer's output makes to the block's output may be
# left once the readers' columns take the scale. Measured on SmolLM2 in bfloat16: 1.4-2.1% for
# the norms; a wrong producer leaves 20% and more. A token whose router scores nearly tie may
# change expert after the rounding.
_FOLD_TOLERANCE = 0.08


@dataclass(frozen=True)
class Fold:
    """Where a group's input comes from: a module (local name) and how to divide its output by s;
    ``readers``: the modules outside the group that read it too (a router), whose weight columns
    are multiplied by s as the group's are."""

    module: str
    kind: FoldKind
    readers: tuple[str, ...] = ()


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
    in_features = block.get_submodule(group[0].local_name).in_features
    members = {t.local_name for t in group}
    consumer = _input_owner(group)
    completed, reference, readers = _trace(block, consumer, members, in_features, sample)
    candidates: list[Fold] = []
    for name, output in completed:
        module = block.get_submodule(name)
        if _same_memory(output, reference):
            if isinstance(module, nn.Linear):
                candidates.append(Fold(name, "rows", readers))
            elif isinstance(getattr(module, "weight", None), Tensor) and module.weight.shape == (in_features,):
                candidates += [Fold(name, "scale", readers), Fold(name, "one_plus", readers)]
    for name, _ in completed:
        module = block.get_submodule(name)
        if isinstance(module, nn.Linear) and module.out_features == in_features and name not in members:
            candidates.append(Fold(name, "rows", readers))
    probe = torch.empty(in_features).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    expected = _block_output(block, sample)
    for fold in candidates:
        if _folds_exactly(block, fold, sorted(members), sample, expected, probe):
            return fold
    return None


def compensate(block: nn.Module, names: list[str] | tuple[str, ...], scales: Tensor) -> None:
    """Multiply the weight columns of ``names`` by ``scales``: they then compute on x / s what they did on x."""
    with torch.no_grad():
        for name in names:
            weight = block.get_submodule(name).weight
            weight.copy_((weight.float() * scales.to(weight.device, torch.float32)).to(weight.dtype))


def merge_expert_inputs(block: nn.Module, groups: list[list[Target]], sample: BlockInputs) -> list[list[Target]]:
    """``groups`` with the first projections of each experts module's experts, and the groups
    that read that module's input itself (shared experts), made one group, in place of the first."""
    modules = sorted({_moe_module(t) for group in groups for t in group if _is_expert_input(t)})
    if not modules:
        return groups
    inputs: dict[str, Tensor] = {}
    firsts = {group[0].local_name: group for group in groups}
    handles = []
    for name in [*modules, *firsts]:
        def capture(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            inputs.setdefault(name, _first_tensor(args, kwargs))
        handles.append(block.get_submodule(name).register_forward_pre_hook(capture, with_kwargs=True))
    try:
        call_block(block, sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    merged: dict[str, list[Target]] = {}
    result: list[list[Target]] = []
    for group in groups:
        first = group[0]
        owner = _moe_module(first) if _is_expert_input(first) else next(
            (m for m in modules if m in inputs and first.local_name in inputs and _same_memory(inputs[first.local_name], inputs[m])), None)
        if owner is None:
            result.append(group)
        elif owner in merged:
            merged[owner].extend(group)
        else:
            merged[owner] = list(group)
            result.append(merged[owner])
    return result


def _is_expert_input(target: Target) -> bool:
    return target.expert is not None and target.local_name.rpartition(".")[2] in ("gate_proj", "up_proj")


def _moe_module(target: Target) -> str:
    """The module an expert's ``ExpertList`` belongs to (``mlp`` of ``mlp.experts.3.gate_proj``), which routes its input."""
    return target.local_name.rsplit(".", 3)[0]


def _input_owner(group: list[Target]) -> str:
    """The module whose input is the group's: its first layer, or the experts' module of a group
    of experts (``merge_expert_inputs``)."""
    expert = next((t for t in group if _is_expert_input(t)), None)
    return group[0].local_name if expert is None else _moe_module(expert)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else next(value for value in kwargs.values() if isinstance(value, Tensor))


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """The same tensor, or a view of it (a router reads ``hidden.view(-1, H)``)."""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def _trace(block: nn.Module, consumer: str, members: set[str], in_features: int,
           sample: BlockInputs) -> tuple[list[tuple[str, Tensor]], Tensor, tuple[str, ...]]:
    """Modules completed before ``consumer`` is called (with their outputs), its input, and the
    other modules holding a weight that read that same input."""
    completed: list[tuple[str, Tensor]] = []
    captured: dict[str, Tensor] = {}
    read: list[tuple[str, Tensor]] = []
    handles = []
    for name, module in block.named_modules():
        if not name:
            continue
        if name == consumer:
            def capture(m: nn.Module, args: tuple, kwargs: dict) -> None:
                captured.setdefault("input", _first_tensor(args, kwargs))
            handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
        def record(m: nn.Module, args: tuple, output: Tensor, name: str = name) -> None:
            if "input" not in captured and isinstance(output, Tensor):
                completed.append((name, output))
        handles.append(module.register_forward_hook(record))
        weight = getattr(module, "weight", None)
        if name not in members and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == in_features:
            def reader(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                if args or kwargs:
                    read.append((name, _first_tensor(args, kwargs)))
            handles.append(module.register_forward_pre_hook(reader, with_kwargs=True))
    try:
        call_block(block, sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    reference = captured["input"]
    readers = tuple(dict.fromkeys(name for name, x in read if name != consumer and _same_memory(x, reference)))
    return completed, reference, readers


def _block_output(block: nn.Module, sample: BlockInputs) -> Tensor:
    hidden, kwargs = sample[:1][0]
    with torch.no_grad():
        out = block(hidden, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def _folds_exactly(block: nn.Module, fold: Fold, members: list[str], sample: BlockInputs, expected: Tensor, probe: Tensor) -> bool:
    """Whether the block computes what it did with the producer's output divided by ``probe`` and
    the columns of the group and the fold's readers multiplied by it. Measured against what the
    division alone changes, not against the output: the residual stream dwarfs one layer's share
    of it. A division that changes nothing (an expert the sample never reaches) proves nothing."""
    changed = [fold.module, *members, *fold.readers]
    saved = {(name, key): tensor.detach().clone() for name in changed for key, tensor in block.get_submodule(name).named_parameters(recurse=False)}
    try:
        apply_fold(block, fold, probe)
        divided = _block_output(block, sample)
        compensate(block, [*members, *fold.readers], probe)
        folded = _block_output(block, sample)
    finally:
        with torch.no_grad():
            for (name, key), tensor in saved.items():
                getattr(block.get_submodule(name), key).copy_(tensor)
    change = (divided - expected).norm()
    return bool(change > 0 and (folded - expected).norm() < _FOLD_TOLERANCE * change)

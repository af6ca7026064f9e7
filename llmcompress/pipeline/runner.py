"""Running blocks: catching block 0's inputs, replaying blocks, and hooking statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import ModelError
from ..passes import Target
from ..stats import Contribution, LayerStats
from .activations import Activations

BlockInputs = Activations


class _StopForward(Exception):
    """Raised from a hook once a forward pass has produced everything that is wanted."""


def catch_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int, device: torch.device,
                       into: Activations | None = None, dtype: torch.dtype | None = None) -> BlockInputs:
    """Run the model up to block 0 on each micro-batch and keep what block 0 was called with
    (in ``into``, default: on ``device``), its floating tensors cast to ``dtype``, the dtype the
    blocks will compute in (default: as the model made them). Across processes, each keeps its
    share of the micro-batches (``distributed.my_share``).

    Everything outside the blocks visits ``device`` for this and returns where it was."""
    caught = into if into is not None else Activations(device)
    home = device_of(model)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        check_finite(hidden, "the input of the first decoder block (the embeddings' output)")
        if dtype is not None:
            hidden, kwargs = hidden.to(dtype), {key: _cast_floating(value, dtype) for key, value in kwargs.items()}
        caught.append(hidden, kwargs)
        raise _StopForward

    move_outside_blocks(model, blocks, device)
    # The hook stops the forward before block 0 computes: a block still on disk (meta) may stay there.
    resident = not any(p.is_meta for p in blocks[0].parameters())
    if resident:
        blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in distributed.my_share(windows.split(batch_size)):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    continue
                raise ModelError(f"{type(model).__name__}'s forward never called its first decoder block: the model cannot be compressed block by block")
    finally:
        handle.remove()
        if resident:
            blocks[0].to(home)
        move_outside_blocks(model, blocks, home)
    return caught


def _cast_floating(value: object, dtype: torch.dtype) -> object:
    """A block keyword with its floating tensors in ``dtype`` (position embeddings are a tuple)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floating(item, dtype) for item in value)
    return value


def call_block(block: nn.Module, inputs: Sequence[tuple[Tensor, dict]]) -> None:
    """Run the block on each micro-batch for its hooks' sake; a hook may stop a pass early."""
    with torch.no_grad():
        for hidden, kwargs in inputs:
            try:
                block(hidden, **kwargs)
            except _StopForward:
                continue


def run_block(block: nn.Module, inputs: BlockInputs, block_name: str | None = None) -> BlockInputs:
    """The block's outputs for each micro-batch, paired with the same keywords, stored like the inputs."""
    outputs = inputs.successor()
    with torch.no_grad():
        for hidden, kwargs in inputs:
            out = block(hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            check_finite(out, f"the output of {block_name or 'the block'}")
            outputs.append(out, kwargs)
    return outputs


def check_finite(activations: Tensor, what: str) -> None:
    """Stop at the first NaN or Inf in the calibration activations, naming where it appeared:
    past this point every statistic is poisoned, and GPTQ would end in a Cholesky traceback."""
    if not torch.isfinite(activations).all():
        overflow = (" (float16 holds at most 65504: convert the model to bfloat16 or float32 before compressing it)"
                    if activations.dtype == torch.float16 else "")
        raise ModelError(f"{what} holds NaN or Inf on the calibration data, in {activations.dtype}{overflow}; "
                         "check the model's weights and the calibration text")


def gather_statistics(block: nn.Module, targets: Sequence[Target], inputs: BlockInputs, wanted: frozenset[str],
                      stop_after_last: bool = False, one_input: bool = False) -> dict[str, LayerStats]:
    """Run the block with hooks on its target Linears and accumulate their input statistics.

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so X^T X is
    computed once per distinct input. With ``stop_after_last`` (targets in call order), each
    pass stops once the last target has been fed, skipping the rest of the block.

    ``one_input`` says that every target reads the same tensor (one of ``input_groups``), so no
    target's output can reach another target's input before the pass stops: the targets then
    return zeros instead of multiplying, which saves their matmuls (a third of a block's work
    over a true-sequential block). A target fed a different tensor raises, since its statistics
    would be wrong.

    Across processes, each runs the block on its own micro-batches and keeps what each adds to
    each accumulator; after every round of micro-batches (one per process), every process adds
    them all in micro-batch order, so each holds the statistics of every micro-batch.
    """
    if one_input and not stop_after_last:
        raise ValueError("one_input skips the targets' matmuls, so it needs stop_after_last")
    stats: dict[str, LayerStats] = {}
    seen: list[tuple[Tensor, LayerStats]] = []  # holding the tensors also keeps their identity unique
    updated: list[LayerStats] = []  # the accumulators already fed this micro-batch
    last = targets[-1].name if stop_after_last and targets else None
    shared = distributed.active()
    owned: dict[str, LayerStats] = {}  # across processes: this process's accumulators, never fed, keyed as ``stats``
    parts: dict[str, tuple[int, Contribution]] = {}  # across processes: this micro-batch's contributions, by their first reader

    def make_hook(target: Target, in_features: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if one_input and seen and x is not seen[0][0]:
                raise RuntimeError(f"{target.name} reads a different tensor from the other layers of its group")
            accumulators = owned if shared else stats
            if target.name not in accumulators:
                reader = next((acc for tensor, acc in seen if tensor is x), None)
                accumulators[target.name] = reader if reader is not None else LayerStats(in_features, wanted)
            accumulator = accumulators[target.name]
            if not any(tensor is x for tensor, _ in seen):
                seen.append((x, accumulator))
            if not any(done is accumulator for done in updated):
                check_finite(x, f"the input of {target.name}")
                if shared:
                    parts[target.name] = (in_features, accumulator.contribution(x, getattr(module, "token_weights", None)))
                else:
                    accumulator.update(x, getattr(module, "token_weights", None))
                updated.append(accumulator)
            if target.name == last:
                raise _StopForward

        return hook

    handles = []
    skipped: list[nn.Module] = []
    try:
        for target in targets:
            linear = block.get_submodule(target.local_name)
            handles.append(linear.register_forward_pre_hook(make_hook(target, linear.in_features)))
            if one_input:
                linear.forward = _zeros_like_output(linear.out_features)
                skipped.append(linear)
        for index in range(distributed.rounds(len(inputs))):
            seen.clear()
            updated.clear()
            if index < len(inputs):
                call_block(block, [inputs[index]])
            if shared:
                _add_round(stats, _named(parts, owned), wanted, inputs.device)
                parts.clear()
    finally:
        for handle in handles:
            handle.remove()
        for linear in skipped:
            del linear.forward
        seen.clear()
    return stats


def _named(parts: dict[str, tuple[int, Contribution]], owned: dict[str, LayerStats]) -> dict[tuple[str, ...], tuple[int, Contribution]]:
    """Each contribution keyed by every target that reads its input, in call order."""
    return {tuple(n for n, acc in owned.items() if acc is owned[name]): part for name, part in parts.items()}


def _add_round(stats: dict[str, LayerStats], parts: dict, wanted: frozenset[str], device: torch.device) -> None:
    """Add every process's contributions of one round to ``stats``, in rank order: micro-batch order."""
    for received in distributed.exchange(parts, device):
        for names, (in_features, part) in received.items():
            if names[0] not in stats:
                accumulator = LayerStats(in_features, wanted)
                stats.update(dict.fromkeys(names, accumulator))
            stats[names[0]].add(part)


def _zeros_like_output(out_features: int):  # noqa: ANN202
    def forward(x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    return forward


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer not inside ``blocks`` (embeddings, norms, rotary tables);
    tensors not read yet (on the meta device) stay where they are."""
    inside = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
    moved: dict[int, Tensor] = {}  # keeps tied weights tied
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or id(tensor) in inside or tensor.device == device or tensor.is_meta:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
                store[key] = moved[id(tensor)]

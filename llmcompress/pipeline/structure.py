"""What to compress: the decoder blocks, the target Linears, and which of them share an input."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..nn import CompressedLinear
from ..passes import Target
from ..passes.state import merged_declarations
from ..flags import RecipeLike, as_recipe
from .runner import BlockInputs, call_block


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks, found by shape rather than by architecture name:
    the longest ``ModuleList`` of identical modules that contain linear layers, preferring one
    whose length is ``config.num_hidden_layers``."""
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


def plan_targets(blocks: nn.ModuleList, blocks_path: str, recipe: RecipeLike) -> list[Target]:
    """Every Linear inside the blocks that some pass of the recipe applies to, with each pass's
    config for it and what the passes declare about it; checks what would fail later."""
    recipe = as_recipe(recipe)
    targets = []
    for index, block in enumerate(blocks):
        for local_name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{blocks_path}.{index}.{local_name}"
            configs = recipe.configs_for(name)
            if configs is None:
                continue
            facts = merged_declarations(configs, name)
            for config in configs:
                if config is not None:
                    config.check_module(name, module.in_features, module.out_features)
            targets.append(Target(name=name, block=index, local_name=local_name, configs=configs, fmt=facts.get("fmt"),
                                  act_format=facts.get("act_format"), split_rank=facts.get("split_rank", 0)))
    if not targets:
        raise ConfigError("the recipe leaves no Linear layer to compress: check its targets, ignore patterns and overrides")
    return targets


def input_groups(block: nn.Module, targets: list[Target], sample: BlockInputs) -> list[list[Target]]:
    """Targets in the order the block calls them, grouped where they read the very same input
    tensor (q/k/v, gate/up). Targets the sample never reaches come last, one per group."""
    calls: list[tuple[Target, torch.Tensor]] = []
    handles = []
    for target in targets:
        def record(module: nn.Module, args: tuple, output: torch.Tensor, target: Target = target) -> None:
            if all(t is not target for t, _ in calls):
                calls.append((target, args[0]))
        handles.append(block.get_submodule(target.local_name).register_forward_hook(record))
    try:
        call_block(block, sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[Target]] = []
    previous_input = None
    for target, x in calls:
        if groups and x is previous_input:
            groups[-1].append(target)
        else:
            groups.append([target])
        previous_input = x
    reached = {t.name for t, _ in calls}
    groups.extend([t] for t in targets if t.name not in reached)
    return groups

"""What to compress: the decoder blocks, the target Linears, and which of them share an input."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..experts import ExpertList, expert_index
from ..nn import CompressedLinear
from ..passes import PassConfig, Target
from ..passes.state import merged_declarations
from ..flags import RecipeLike, as_recipe
from .runner import BlockInputs, call_block

# Why a weight is left uncompressed (``coverage``); the first three are the recipe's choice.
SKIPPED = "skipped by the recipe (ignore, targets or skip)"
ROUTER = "router (kept in 16 bits; name it in a pass's targets to compress it)"
TOO_SMALL = "too small for every pass"
CUSTOM_LINEAR = "an nn.Linear subclass with its own forward"
_EXPERT_NUMBER = re.compile(r"\.\d+\.")


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
    return plan_layers(blocks, blocks_path, recipe)[0]


def plan_layers(blocks: nn.ModuleList, blocks_path: str, recipe: RecipeLike) -> tuple[list[Target], dict[str, str]]:
    """The targets (see ``plan_targets``), and why each other Linear of the blocks is left alone.

    Routers stay in 16 bits unless a pass's ``targets`` name them: they choose the experts, and
    their error moves whole tokens to other experts. A module too small for a pass's group, rank
    or N:M pattern gets the pass's smaller variant, or is left to the other passes, with a note."""
    recipe = as_recipe(recipe)
    targets, left = [], {}
    applied: dict[int, int] = {}  # recipe pass -> modules it applies to
    refused: dict[int, list[ConfigError]] = {}  # recipe pass -> why each module it applies to was too small for it
    for index, block in enumerate(blocks):
        for local_name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{blocks_path}.{index}.{local_name}"
            configs = recipe.configs_for(name)
            if configs is None:
                left[name] = SKIPPED
                continue
            named = recipe.names_explicitly(name)
            if is_router(block, local_name, module) and not named:
                left[name] = ROUTER
                continue
            if type(module).forward is not nn.Linear.forward:
                # Llama 4's router subclasses nn.Linear and also picks the experts: a compressed layer cannot stand in for it.
                if named:
                    raise ConfigError(f"{name} is a {type(module).__name__}, an nn.Linear whose forward does more than multiply: "
                                      "it cannot be replaced by a compressed layer; leave it out of the pass's targets")
                left[name] = f"{CUSTOM_LINEAR} ({type(module).__name__})"
                continue
            for position, config in enumerate(configs):
                applied[position] = applied.get(position, 0) + (config is not None)
            configs, notes = _fitted(configs, name, module, refused)
            if all(c is None for c in configs):
                left[name] = f"{TOO_SMALL}: {'; '.join(notes)}"
                continue
            facts = merged_declarations(configs, name)
            targets.append(Target(name=name, block=index, local_name=local_name, configs=configs, fmt=facts.get("fmt"),
                                  act_format=facts.get("act_format"), split_rank=facts.get("split_rank", 0),
                                  expert=expert_index(local_name, block), notes=tuple(notes)))
    # A pass that fits no module at all was asked for something impossible, not for a fallback.
    for position, errors in refused.items():
        if len(errors) == applied[position]:
            raise errors[0]
    if not targets:
        raise ConfigError("the recipe leaves no Linear layer to compress: check its targets, ignore patterns and overrides")
    return targets, left


def _fitted(configs: tuple[PassConfig | None, ...], name: str, module: nn.Linear,
            refused: dict[int, list[ConfigError]]) -> tuple[tuple[PassConfig | None, ...], list[str]]:
    fitted, notes = [], []
    for position, config in enumerate(configs):
        if config is not None:
            config, note = config.for_module(module.in_features, module.out_features)
            if note:
                notes.append(note)
            try:
                config.check_module(name, module.in_features, module.out_features)
            except ConfigError as err:
                refused.setdefault(position, []).append(err)
                config, note = config.fitted(module.in_features, module.out_features)
                if config is not None:
                    config.check_module(name, module.in_features, module.out_features)
                notes.append(note)
        fitted.append(config)
    return tuple(fitted), notes


def is_router(block: nn.Module, local_name: str, module: nn.Module) -> bool:
    """A module that routes tokens: a class called a router (Llama 4's subclasses nn.Linear), or a
    weight beside a block's experts with one row per expert, or one row (Qwen2-MoE's
    ``shared_expert_gate``)."""
    if "router" in type(module).__name__.lower():
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    parent_name = local_name.rpartition(".")[0]
    parent = block.get_submodule(parent_name) if parent_name else block
    experts = [child for child in parent.children() if isinstance(child, ExpertList)]
    return any(weight.shape[0] in (1, len(e)) for e in experts)


def stages(groups: list[list[Target]]) -> list[tuple[list[Target], bool]]:
    """Input groups as the stages of a true-sequential block, each with whether all its layers
    read one tensor (never said of experts: which of them a micro-batch reaches varies). The same group of every expert (gate/up, then down) is one stage: no
    expert's inputs depend on another's weights, and one stage per expert would run the block
    twice per expert."""
    merged: list[tuple[list[Target], bool]] = []
    position: dict[str, int] = {}  # a projection of the experts (``mlp.experts.*.down_proj``) -> its stage
    for group in groups:
        keys = [_EXPERT_NUMBER.sub(".*.", t.local_name) for t in group if t.expert is not None]
        known = next((position[k] for k in keys if k in position), None)
        if known is not None:
            merged[known] = (merged[known][0] + group, False)
        else:
            known = len(merged)
            merged.append((list(group), not keys))
        position.update(dict.fromkeys(keys, known))
    return merged


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

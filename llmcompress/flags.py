"""The shorthand: a ``CompressConfig`` (what the CLI's flags and the older API describe) turned
into the recipe it stands for. This is the one place that maps method names onto passes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .config import CompressConfig, ModuleOverride
from .passes import LowRankPassConfig, PrunePassConfig, QuantizePassConfig, RotatePassConfig, SmoothPassConfig
from .recipe import Override, PassEntry, Recipe, load_recipe

RecipeLike = Recipe | CompressConfig | Mapping | str | os.PathLike

_QUANTIZE_OVERRIDES = ("kind", "bits", "group_size", "symmetric")
_LOWRANK_OVERRIDES = ("rank",)


def as_recipe(recipe: RecipeLike | None) -> Recipe:
    """A recipe from a recipe object, a dict, a YAML file's path, or the flag-shaped
    ``CompressConfig`` (None: its defaults, RTN INT4 g128)."""
    if recipe is None:
        recipe = CompressConfig()
    return recipe_from_config(recipe) if isinstance(recipe, CompressConfig) else load_recipe(recipe)


def recipe_from_config(config: CompressConfig) -> Recipe:
    leading_skips = 0
    while leading_skips < len(config.overrides) and config.overrides[leading_skips].skip:
        leading_skips += 1
    ignore = tuple(o.pattern for o in config.overrides[:leading_skips])
    rest = config.overrides[leading_skips:]
    entries = []
    if config.rotate:
        entries.append(PassEntry("rotate", RotatePassConfig()))
    if config.uses_awq:
        entries.append(PassEntry("smooth", SmoothPassConfig(method="awq", grid=config.awq.grid, duo_scaling=config.awq.duo_scaling),
                                 overrides=_overrides(rest, ())))
    elif config.uses_svdquant:
        entries.append(PassEntry("smooth", SmoothPassConfig(method="svdquant", grid=config.lowrank.smooth_grid), overrides=_overrides(rest, ())))
    if config.prune.enabled:
        prune, gptq = config.prune, config.gptq
        entries.append(PassEntry("prune", PrunePassConfig(method=prune.method, sparsity=prune.sparsity, pattern=prune.pattern,
                                                          true_sequential=gptq.true_sequential, damp=gptq.damp, block_size=gptq.block_size),
                                 overrides=_overrides(rest, ())))
    if config.quant is not None:
        entries.append(PassEntry("quantize", _quantize(config), overrides=_overrides(rest, _QUANTIZE_OVERRIDES)))
    if config.wants_lowrank:
        lowrank = config.lowrank
        entries.append(PassEntry("lowrank", LowRankPassConfig(method=lowrank.method, rank=lowrank.rank, alloc=lowrank.alloc,
                                                              dtype=lowrank.dtype, eora_damp=lowrank.eora_damp),
                                 overrides=_overrides(rest, _LOWRANK_OVERRIDES)))
    return Recipe(passes=tuple(entries), calib=config.calib, ignore=ignore)


def _quantize(config: CompressConfig) -> QuantizePassConfig:
    fmt = config.quant
    common: dict[str, Any] = {"kind": fmt.kind, "bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric,
                              "act_bits": config.act_bits, "act_kind": config.act_kind}
    if config.uses_gptq:
        gptq = config.gptq
        return QuantizePassConfig(method="gptq", damp=gptq.damp, block_size=gptq.block_size, act_order=gptq.act_order,
                                  static_groups=gptq.static_groups, true_sequential=gptq.true_sequential, clip=gptq.clip,
                                  clip_grid=gptq.clip_grid, max_shrink=gptq.max_shrink, **common)
    if config.uses_awq and config.awq.clip:
        return QuantizePassConfig(method="rtn", clip=True, clip_grid=config.awq.clip_grid, max_shrink=config.awq.max_shrink, **common)
    return QuantizePassConfig(method="rtn", **common)


def _overrides(overrides: tuple[ModuleOverride, ...], fields: tuple[str, ...]) -> tuple[Override, ...]:
    """The overrides as one pass sees them: each keeps its place (the first match wins), with
    only the fields this pass takes; trailing ones that change nothing here are dropped."""
    entries = [Override(pattern=o.pattern, skip=o.skip,
                        options=() if o.skip else tuple((f, getattr(o, f)) for f in fields if getattr(o, f) is not None))
               for o in overrides]
    while entries and not entries[-1].skip and not entries[-1].options:
        entries.pop()
    return tuple(entries)

"""What every pass is: a registered kind with a typed, frozen config, and what it declares.

A pass never reads another pass's state or config by name. What passes need from each other is
declared: a quantize pass declares the format a module will be stored in (``declare``), which a
smoothing search optimises for; a pass that can prune inside its column loop says so
(``runs_column_loop``), and a pruning pass that chooses its mask there hands it over instead of
pruning first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from ..errors import ConfigError
from .options import PassConfig
from .state import LayerState, Target


class Pass:
    """One kind of pass. ``phase`` "model": it rewrites the whole float model once, before any
    block is calibrated (rotations), and applies to no module by itself; "block": it searches per
    input group on the float block before
    any layer pass (smoothing), and the pipeline folds what it returns; "layer": it transforms the
    ``LayerState`` of each layer of a stage (``prepare`` for every layer pass first, then ``apply``,
    both in recipe order). ``after``: kinds that must come earlier in a recipe."""

    kind: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    phase: ClassVar[str] = "layer"
    after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, index: int) -> None:
        self.index = index  # this pass's position in the recipe: ``Target.configs[index]`` is its config

    def later_configs(self, state: LayerState) -> tuple[PassConfig, ...]:
        """The configs of the passes after this one that apply to the state's module."""
        return tuple(c for c in state.target.configs[self.index + 1:] if c is not None)

    def prepare(self, layers: Sequence[tuple[LayerState, PassConfig]]) -> None:
        """Work that must happen before any layer pass applies (SVDQuant's split)."""

    def apply(self, layers: Sequence[tuple[LayerState, PassConfig]]) -> None:
        raise NotImplementedError

    def layers_independent(self, configs: Sequence[PassConfig | None]) -> bool:
        """Whether this pass, with these configs for a stage's layers (None: not applied), gives
        each group of layers sharing one H the result it gives it beside the others: then processes
        may each compress some groups (``llmcompress.distributed``). A pass that does not say so
        runs on every layer in every process."""
        return False


REGISTRY: dict[str, type[Pass]] = {}
# In the order a recipe runs them.
PHASES = ("model", "block", "layer")


def register(pass_class: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass kind available to recipes under ``pass_class.kind``."""
    kind = getattr(pass_class, "kind", None)
    if not isinstance(kind, str) or not kind.isidentifier():
        raise TypeError(f"{pass_class.__name__}.kind must be a name such as 'quantize', got {kind!r}")
    if kind in REGISTRY and REGISTRY[kind] is not pass_class:
        raise ValueError(f"a pass kind {kind!r} is already registered ({REGISTRY[kind].__name__})")
    if not (isinstance(pass_class.config_class, type) and issubclass(pass_class.config_class, PassConfig)
            and dataclasses.is_dataclass(pass_class.config_class)):
        raise TypeError(f"{pass_class.__name__}.config_class must be a frozen dataclass subclassing PassConfig")
    if pass_class.phase not in PHASES:
        raise TypeError(f"{pass_class.__name__}.phase must be one of {', '.join(PHASES)}")
    REGISTRY[kind] = pass_class
    pass_class.config_class.pass_kind = kind
    return pass_class


def pass_class(kind: str) -> type[Pass]:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown pass {kind!r}: the passes are {', '.join(sorted(REGISTRY))}")
    return REGISTRY[kind]


__all__ = ["LayerState", "Pass", "PassConfig", "REGISTRY", "Target", "pass_class", "register"]

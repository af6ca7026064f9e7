"""What every pass is: a registered kind with a typed, frozen config, and what it declares.

A pass never reads another pass's state or config by name. What passes need from each other is
declared: a quantize pass declares the format a module will be stored in (``declare``), which a
smoothing search optimises for; a pass that can prune inside its column loop says so
(``runs_column_loop``), and a pruning pass that chooses its mask there hands it over instead of
pruning first.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..errors import ConfigError
from .state import LayerState, Target


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of every pass's options. Subclasses are frozen dataclasses validated in
    ``__post_init__``; every field is a plain value (int, float, str, bool, None), so a recipe
    file holds them as they are."""

    def with_options(self, **options: Any) -> PassConfig:
        """This config with some fields replaced (a per-module override), validated again."""
        return dataclasses.replace(self, **options)

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def sequential(self) -> bool:
        """Whether the layers should see the inputs that the already-compressed layers before
        them produce (one stage per input group) rather than the float block's."""
        return False

    @property
    def runs_column_loop(self) -> bool:
        """Whether this pass walks the weight's columns with Hessian updates (GPTQ's loop), so a
        pruning pass before it may choose its mask inside that loop."""
        return False

    def statistics(self) -> frozenset[str]:
        """The per-layer calibration statistics (``llmcompress.stats``) this pass reads."""
        return frozenset()

    def declare(self) -> dict[str, Any]:
        """Facts about a module this pass fixes before any pass runs: ``fmt`` (its storage
        format), ``act_format``, ``split_rank`` (a branch split off before quantization)."""
        return {}

    def requires(self) -> tuple[str, ...]:
        """Facts (see ``declare``) that another pass must fix for every module this one applies to."""
        return ()

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        """Raise ``ConfigError`` if this config cannot apply to a module of this shape."""

    def label(self) -> str:
        """The method's name as the per-layer report shows it."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.label()

    def report_labels(self) -> dict[str, Any]:
        """This pass's part of a run's labels in ``compress report`` tables: ``method`` (joined
        with '+' across passes), or its own columns (``weights``, ``pruning``, ``branch``, ...)."""
        return {"method": self.label()}

    def summary_note(self) -> str:
        """A line for the CLI's closing summary, where this pass has something to say there."""
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; {cls.kind_name()} takes {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def kind_name(cls) -> str:
        return next((kind for kind, p in REGISTRY.items() if p.config_class is cls), cls.__name__)


class Pass:
    """One kind of pass. ``phase`` "block": it searches per input group on the float block before
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


REGISTRY: dict[str, type[Pass]] = {}


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
    if pass_class.phase not in ("block", "layer"):
        raise TypeError(f"{pass_class.__name__}.phase must be 'block' or 'layer'")
    REGISTRY[kind] = pass_class
    return pass_class


def pass_class(kind: str) -> type[Pass]:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown pass {kind!r}: the passes are {', '.join(sorted(REGISTRY))}")
    return REGISTRY[kind]


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed: one of {', '.join(map(str, choices))}")


def choices_of(literal: Any) -> tuple[Any, ...]:
    return typing.get_args(literal)


__all__ = ["LayerState", "Pass", "PassConfig", "REGISTRY", "Target", "check_choice", "pass_class", "register"]

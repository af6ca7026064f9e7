"""The base of every pass's options, and small validation helpers for them."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of every pass's options. Subclasses are frozen dataclasses validated in
    ``__post_init__``; every field is a plain value (int, float, str, bool, None), so a recipe
    file holds them as they are."""

    pass_kind: ClassVar[str | None] = None  # set when its pass registers

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

    def for_module(self, in_features: int, out_features: int) -> tuple[PassConfig, str]:
        """This config as it applies to a module of this shape, where it adapts without giving up
        what was asked (a group size that does not divide the inputs), and a note saying how;
        ``(self, "")`` where it applies as it is. Runs before ``check_module``."""
        return self, ""

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        """Raise ``ConfigError`` if this config cannot apply to a module of this shape."""

    def fitted(self, in_features: int, out_features: int) -> tuple[PassConfig | None, str]:
        """Where ``check_module`` refuses a module (too small for a group, rank or pattern): a
        variant of this config that fits it, or None to leave it to the other passes, and a
        note saying which."""
        return None, f"{self.kind_name()} left out ({out_features}x{in_features} is too small for it)"

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
        return cls.pass_kind or cls.__name__


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed: one of {', '.join(map(str, choices))}")


def choices_of(literal: Any) -> tuple[Any, ...]:
    return typing.get_args(literal)

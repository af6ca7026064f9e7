"""The ``quantize`` pass: RTN (optionally after a clipping search) or GPTQ (with its range
search), into any number format; the weight's codes and what they represent go to the state."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..actformat import ACT_KINDS, PER_TOKEN, ActFormat, static_scale
from ..config import ACT_BITS, ACT_GROUP_SIZE, FORMAT_KINDS, PER_CHANNEL, QuantFormat
from ..errors import ConfigError
from ..formats import dequantize, dividing_group, split_rows
from ..methods.awq import search_clipping
from ..methods.gptq import gptq
from ..methods.rtn import rtn
from ..stats import ABS_MAX, HESSIAN
from .base import Pass, register
from .options import PassConfig, check_choice, choices_of
from .state import LayerState, column_batches

QuantizeMethod = Literal["rtn", "gptq"]
# GPTQ's options; under RTN they stay unset.
_GPTQ_ONLY = ("damp", "block_size", "act_order", "static_groups", "true_sequential")
# Options of the activation format, which only act_bits turns on.
_ACT_OPTIONS = ("act_kind", "act_group_size", "act_static", "act_pow2")
# The clipping search's grid and reach: AWQ's (20 steps, up to half the range) for RTN; for
# GPTQ's static groups, finer and shorter (shrinking by up to 0.5 made W4 asym 2% worse on SmolLM2).
_CLIP_DEFAULTS = {"rtn": (20, 0.5), "gptq": (50, 0.2)}


@dataclasses.dataclass(frozen=True)
class QuantizePassConfig(PassConfig):
    """``method``: ``rtn`` or ``gptq``. The format: ``kind`` (int, nvfp4, mxfp4), ``bits``,
    ``group_size`` (-1: per channel), ``symmetric``. ``act_bits`` quantizes the activations
    entering the low-bit matmul (4 or 8): as ``act_kind`` (int, fp8_e4m3, fp8_e5m2; FP4 weights
    take their own FP4 unless it is given), in groups of ``act_group_size`` features per token
    (-1: one scale per token, the default but for INT4's 64), with one ``act_static`` scale per
    tensor calibrated offline instead, and ``act_pow2`` scales rounded up to powers of two
    (ZeroQuant-FP: free to convert between FP formats). ``clip``: search each
    (row, group) range on the calibration output error before rounding (default: off for RTN, on
    for GPTQ with static groups). GPTQ alone: ``damp``, ``block_size``, ``act_order``,
    ``static_groups``, ``true_sequential``."""

    method: QuantizeMethod = "rtn"
    kind: str = "int"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool | None = None
    act_bits: int | None = None
    act_kind: str | None = None
    act_group_size: int | None = None
    act_static: bool | None = None
    act_pow2: bool | None = None
    clip: bool | None = None
    clip_grid: int | None = None
    max_shrink: float | None = None
    damp: float | None = None
    block_size: int | None = None
    act_order: bool | None = None
    static_groups: bool | None = None
    true_sequential: bool | None = None

    def __post_init__(self) -> None:
        owner = "quantize"
        check_choice(owner, "method", self.method, choices_of(QuantizeMethod))
        check_choice(owner, "kind", self.kind, FORMAT_KINDS)
        fmt = QuantFormat(kind=self.kind, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)
        object.__setattr__(self, "group_size", fmt.group_size)
        object.__setattr__(self, "symmetric", fmt.symmetric)
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ConfigError(f"quantize.act_bits={self.act_bits!r} is not allowed: 4 or 8 (leave it out for 16-bit activations)")
        given = [name for name in _ACT_OPTIONS if getattr(self, name) is not None]
        if self.act_bits is None and given:
            raise ConfigError(f"quantize: {', '.join(given)} shape{'s' if len(given) == 1 else ''} quantized activations: give act_bits "
                              "(8 for W8A8 or W4A8, 4 for W4A4) too")
        if self.act_kind is not None:
            check_choice(owner, "act_kind", self.act_kind, ACT_KINDS[:3])
        self.activation_format  # noqa: B018 - builds it, so a bad combination fails here
        if self.method == "gptq":
            self._set_defaults(damp=0.01, block_size=128, act_order=True, static_groups=True, true_sequential=True)
            self._set_defaults(clip=self.static_groups)
            if not 0 < self.damp <= 1:
                raise ConfigError(f"quantize.damp={self.damp!r} is not allowed: a fraction in (0, 1], typically 0.01")
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ConfigError(f"quantize.block_size={self.block_size!r} is not allowed: a positive integer, typically 128")
            if self.clip and not self.static_groups:
                raise ConfigError("quantize.clip=True is not allowed with static_groups=False: the range search fixes the groups "
                                  "up front; use static groups or clip: false")
        else:
            given = [name for name in _GPTQ_ONLY if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"quantize: {', '.join(given)} {'is a GPTQ option' if len(given) == 1 else 'are GPTQ options'}; "
                                  f"use method: gptq, or leave {'it' if len(given) == 1 else 'them'} out")
            self._set_defaults(clip=False)
        grid, shrink = _CLIP_DEFAULTS[self.method]
        self._set_defaults(clip_grid=grid, max_shrink=shrink)
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ConfigError(f"quantize.clip_grid={self.clip_grid!r} is not allowed: a positive integer, typically {grid}")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"quantize.max_shrink={self.max_shrink!r} is not allowed: a fraction in [0, 1), typically {shrink}")

    def _set_defaults(self, **defaults: Any) -> None:
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def with_options(self, **options: Any) -> QuantizePassConfig:
        if "kind" in options and options["kind"] != self.kind:
            # Another format family keeps its own defaults instead of inheriting ours.
            options = {"group_size": None, "symmetric": None, **options}
        if "method" in options and options["method"] != self.method:
            options = {**dict.fromkeys(_GPTQ_ONLY + ("clip", "clip_grid", "max_shrink")), **options}
        return dataclasses.replace(self, **options)

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(kind=self.kind, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def activation_format(self) -> ActFormat | None:
        if self.act_bits is None:
            return None
        if self.format.is_fp4 and self.act_kind is None:
            return ActFormat.from_quant_format(QuantFormat(kind=self.kind))
        kind = self.act_kind or "int"
        group = self.act_group_size
        if group is None:
            group = ACT_GROUP_SIZE if kind == "int" and self.act_bits == 4 and not self.act_static else PER_TOKEN
        try:
            return ActFormat(kind=kind, bits=self.act_bits, group_size=group, static=bool(self.act_static), pow2_scales=bool(self.act_pow2))
        except ConfigError as err:
            raise ConfigError(f"quantize activations: {err}") from err

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or bool(self.clip) or bool(self.act_static)

    @property
    def sequential(self) -> bool:
        return bool(self.true_sequential)

    @property
    def runs_column_loop(self) -> bool:
        return self.method == "gptq"

    def statistics(self) -> frozenset[str]:
        wanted = {HESSIAN} if self.method == "gptq" or self.clip else set()
        return frozenset(wanted | ({ABS_MAX} if self.act_static else set()))

    def declare(self) -> dict[str, Any]:
        return {"fmt": self.format, "act_format": self.activation_format}

    def for_module(self, in_features: int, out_features: int) -> tuple[QuantizePassConfig, str]:
        group = self.group_size
        if self.format.is_fp4 or group == PER_CHANNEL or group > in_features or in_features % group == 0:
            return self, ""
        # Serving formats and vLLM refuse a ragged last group: a dividing group keeps the layer servable.
        fitting = dividing_group(in_features, group)
        label = "per channel" if fitting == PER_CHANNEL else f"group_size {fitting}"
        return self.with_options(group_size=fitting), f"group_size {group} does not divide {in_features} inputs: {label}"

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        fmt = self.format
        if fmt.group_size != PER_CHANNEL and fmt.group_size > in_features and not fmt.is_fp4:
            raise ConfigError(f"group_size={fmt.group_size} is larger than {name}'s {in_features} input features: "
                              f"use a smaller group, -1 (per channel), or an override for this module")

    def fitted(self, in_features: int, out_features: int) -> tuple[QuantizePassConfig | None, str]:
        return (self.with_options(group_size=PER_CHANNEL),
                f"group_size {self.group_size} > {in_features} input features: quantized per channel instead")

    def label(self) -> str:
        return self.method

    def describe(self) -> str:
        return f"{self.method} {self.weights_label()}"

    def weights_label(self) -> str:
        act = self.activation_format
        return self.format.describe() + (f", activations {act.describe()}" if act else "")

    def report_labels(self) -> dict[str, Any]:
        return {"method": self.method, "weights": self.weights_label()}


@register
class QuantizePass(Pass):
    kind = "quantize"
    config_class = QuantizePassConfig

    def layers_independent(self, configs: Sequence[QuantizePassConfig | None]) -> bool:
        return True

    def apply(self, layers: Sequence[tuple[LayerState, QuantizePassConfig]]) -> None:
        for state, config in layers:
            _static_activation_scale(state, config)
        for batch in column_batches(layers):
            state, config = batch[0]
            if config.method == "gptq" and state.hessian is not None:
                _gptq(batch)
            else:
                for state, config in batch:
                    _rtn(state, config)


def _static_activation_scale(state: LayerState, config: QuantizePassConfig) -> None:
    act = config.activation_format
    if act is None or not act.static:
        return
    if state.act_abs_max is None:
        raise ConfigError(f"{state.target.name} received no calibration input, so it has no static activation scale: use dynamic "
                          "activation scales (act_static: false), or calibrate on more text")
    state.act_scale = static_scale(state.act_abs_max, act)


def _rtn(state: LayerState, config: QuantizePassConfig) -> None:
    weight = state.weight
    if config.clip and state.hessian is not None:
        weight = search_clipping(weight, state.hessian, config.format, grid=config.clip_grid, max_shrink=config.max_shrink)
    elif config.needs_calibration:
        state.note(f"no calibration input reached this layer: RTN{'' if config.method == 'rtn' else ' instead of GPTQ'}, no clipping")
    state.quantized = rtn(weight, config.format)
    state.approximation = dequantize(state.quantized, config.format)
    state.methods.append("rtn")


def _gptq(batch: list[tuple[LayerState, QuantizePassConfig]]) -> None:
    states = [state for state, _ in batch]
    first, config = batch[0]
    fmt, hessian = config.format, first.hessian
    sizes = [state.weight.shape[0] for state in states]
    ranges = None
    if config.clip:
        ranges = torch.cat([search_clipping(s.weight, hessian, fmt, grid=config.clip_grid, max_shrink=config.max_shrink) for s in states])
    mask = None
    if any(state.mask is not None for state in states):
        mask = torch.cat([torch.ones_like(s.weight, dtype=torch.bool) if s.mask is None else s.mask for s in states])
    pruning = first.column_prune
    result = gptq(torch.cat([s.weight for s in states]), hessian, fmt, damp=config.damp, block_size=config.block_size,
                  act_order=config.act_order, static_groups=config.static_groups, mask=mask,
                  sparsity=None if pruning is None else pruning.sparsity, n_m=None if pruning is None else pruning.n_m, ranges=ranges)
    notes = [f"damp raised to {result.damp:g}" if result.damp > config.damp else "",
             f"{result.dead_columns} dead input channels" if result.dead_columns else "",
             "act-order off: SparseGPT's N:M runs follow the input order" if pruning and pruning.n_m and config.act_order else ""]
    masks = [None] * len(states) if result.mask is None else list(result.mask.split(sizes))
    for state, quantized, layer_mask in zip(states, split_rows(result.quantized, sizes), masks, strict=True):
        state.quantized = quantized
        state.approximation = dequantize(quantized, fmt)
        state.mask = layer_mask
        state.column_prune = None
        state.methods.append("gptq")
        for note in notes:
            state.note(note)

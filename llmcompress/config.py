"""Typed, frozen configuration, validated on construction and serialised into every checkpoint.

Every error names the field, the bad value and what is allowed, so that a typo on the command
line or in a JSON file is caught before any model is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

FormatKind = Literal["int", "nvfp4", "mxfp4"]
FORMAT_KINDS: tuple[str, ...] = typing.get_args(FormatKind)
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
# FP4 formats fix their group: the scale layout is part of the format's definition.
FP4_GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}
PER_CHANNEL = -1

Method = Literal["rtn", "gptq", "awq", "awq+gptq"]
METHODS: tuple[str, ...] = typing.get_args(Method)
LowRankMethod = Literal["eora", "lorc", "svdquant"]
LOWRANK_METHODS: tuple[str, ...] = typing.get_args(LowRankMethod)
RankAllocation = Literal["uniform", "energy"]
LowRankDtype = Literal["float16", "int8"]
PruneMethod = Literal["magnitude", "wanda", "sparsegpt"]
PRUNE_METHODS: tuple[str, ...] = typing.get_args(PruneMethod)
UNSTRUCTURED = "unstructured"
ACT_BITS = (4, 8)
# SVDQuant's W4A4 groups INT4 activations by 64 along the input; FP4 activations use the
# weight's own FP4 format.
ACT_GROUP_SIZE = 64


def parse_n_m(pattern: str) -> tuple[int, int] | None:
    """(N, M) of a pattern written ``N:M``; None for anything else."""
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    return None if match is None else (int(match.group(1)), int(match.group(2)))


# How mixture-of-experts layers are calibrated (``CalibConfig.experts``).
EXPERT_CALIBRATION = ("routed", "all")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{owner}.{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class QuantFormat:
    """How one weight matrix is stored: the number format, its bit width and its scale grouping.

    ``group_size`` counts input features per scale; ``-1`` means one scale per output channel.
    ``symmetric`` defaults to False (asymmetric, with zero points) for INT and is always True
    for the FP4 formats, whose codes are sign-magnitude.
    """

    kind: FormatKind = "int"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        owner = "QuantFormat"
        if self.kind not in FORMAT_KINDS:
            _fail(owner, "kind", self.kind, f"one of {', '.join(FORMAT_KINDS)}")
        if self.kind == "int":
            if self.bits not in INT_BITS:
                _fail(owner, "bits", self.bits, "integer formats take 2 to 8 bits")
            group = 128 if self.group_size is None else self.group_size
            if not isinstance(group, int) or not (group == PER_CHANNEL or (group >= 8 and group % 8 == 0)):
                _fail(owner, "group_size", group, "-1 (per channel) or a positive multiple of 8 such as 32, 64, 128")
            symmetric = False if self.symmetric is None else self.symmetric
        else:
            if self.bits != 4:
                _fail(owner, "bits", self.bits, f"{self.kind} is a 4-bit format; use bits=4")
            group = FP4_GROUP_SIZE[self.kind] if self.group_size is None else self.group_size
            if group != FP4_GROUP_SIZE[self.kind]:
                _fail(owner, "group_size", group, f"{self.kind} fixes group_size={FP4_GROUP_SIZE[self.kind]}")
            if self.symmetric is False:
                _fail(owner, "symmetric", False, f"{self.kind} codes are sign-magnitude, so it is always symmetric")
            symmetric = True
        object.__setattr__(self, "group_size", group)
        object.__setattr__(self, "symmetric", symmetric)

    @property
    def is_fp4(self) -> bool:
        return self.kind != "int"

    def describe(self) -> str:
        if self.is_fp4:
            return self.kind.upper()
        group = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"INT{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class CalibConfig:
    """Which text calibrates the model and how it is cut into token windows.

    ``source`` is ``austen:train`` (bundled, the default), another bundled split, a path to a
    ``.txt`` or ``.jsonl`` file, ``hf:NAME[:CONFIG][:SPLIT]`` for a ``datasets`` dataset, or
    ``none`` for data-free methods.
    """

    source: str = "austen:train"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    # Mixture-of-experts: ``routed`` (each expert's statistics come from the tokens routed to it,
    # weighted by their router weights) or ``all`` (every expert also sees every token, unweighted;
    # the block's outputs still follow the routing). An expert that saw fewer than
    # ``expert_min_tokens`` tokens is compressed data-free (RTN, LoRC, magnitude) and reported.
    experts: str = "routed"
    expert_min_tokens: int = 16
    # The dtype calibration forwards compute in. ``auto``: the stored dtype on a GPU and for
    # float32 models; a 16-bit model on a CPU computes in bfloat16 where the CPU has it natively
    # (AVX512-BF16, AMX), else in float32 (CPUs run float16 matmuls ~30x slower than float32).
    # Statistics accumulate in float32 either way, and the weights compressed stay as stored.
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        owner = "CalibConfig"
        if not isinstance(self.source, str) or not self.source.strip():
            _fail(owner, "source", self.source, "a bundled name, a file path, hf:NAME, or none")
        for name, low in (("nsamples", 1), ("seqlen", 8), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                _fail(owner, name, value, f"an integer >= {low}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            _fail(owner, "seed", self.seed, "an integer")
        if self.experts not in EXPERT_CALIBRATION:
            _fail(owner, "experts", self.experts, " or ".join(EXPERT_CALIBRATION))
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail(owner, "compute_dtype", self.compute_dtype, " or ".join(COMPUTE_DTYPES))
        if not isinstance(self.expert_min_tokens, int) or isinstance(self.expert_min_tokens, bool) or self.expert_min_tokens < 0:
            _fail(owner, "expert_min_tokens", self.expert_min_tokens, "an integer >= 0")

    @property
    def is_none(self) -> bool:
        return self.source.strip().lower() == "none"


@dataclass(frozen=True)
class ModuleOverride:
    """Per-module exception, matched with ``re.search`` on the full module name.

    ``skip`` keeps the module in its original precision; otherwise any field given replaces
    the global format's field for the matching modules. The first matching override wins.
    """

    pattern: str
    skip: bool = False
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    kind: FormatKind | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            _fail("ModuleOverride", "pattern", self.pattern, f"a valid regular expression ({err})")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0):
            _fail("ModuleOverride", "rank", self.rank, "a non-negative integer (0: no low-rank branch)")

    def matches(self, module_name: str) -> bool:
        return re.search(self.pattern, module_name) is not None

    def apply(self, base: QuantFormat) -> QuantFormat | None:
        if self.skip:
            return None
        changes = {
            name: getattr(self, name)
            for name in ("kind", "bits", "group_size", "symmetric")
            if getattr(self, name) is not None
        }
        if "kind" in changes and changes["kind"] != base.kind:
            # A different format family keeps its own defaults instead of inheriting ours.
            changes.setdefault("group_size", None)
            changes.setdefault("symmetric", None)
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options: dampening (fraction of the mean Hessian diagonal), lazy-update block size,
    act-order (columns by descending Hessian diagonal), static groups (group parameters fixed
    before act-order permutes columns, so groups stay contiguous), true-sequential order."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    # Static groups measured better on SmolLM2 (INT3 g64: 44.80 vs 48.73 with dynamic groups),
    # and their contiguous groups need no g_idx at inference.
    static_groups: bool = True
    true_sequential: bool = True
    # Range search for static groups: each (row, group) range shrunk by the ratio in
    # [1 - max_shrink, 1] (steps of 1/clip_grid) that minimises that group's output error, and
    # GPTQ then targets the unclipped weight. On SmolLM2 (g64, 128 x 512 calibration) it lowered
    # perplexity at every setting measured: W3 asym 44.80 -> 39.97, W4 asym and sym by about 0.4.
    # Shrinking by up to 0.5 instead made W4 asym 2% worse, and clipping the weight GPTQ targets
    # was worse than no search at all. None means on with static groups, off with dynamic ones
    # (which fit each group only when GPTQ reaches it, so there is nothing to search up front).
    clip: bool | None = None
    clip_grid: int = 50
    max_shrink: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.damp <= 1:
            _fail("GPTQConfig", "damp", self.damp, "a fraction in (0, 1], typically 0.01")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            _fail("GPTQConfig", "block_size", self.block_size, "a positive integer, typically 128")
        if self.clip is None:
            object.__setattr__(self, "clip", self.static_groups)
        if self.clip and not self.static_groups:
            _fail("GPTQConfig", "clip", self.clip, "off with dynamic groups (the range search fixes the groups up front): "
                  "use static groups or --no-gptq-clip")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            _fail("GPTQConfig", "clip_grid", self.clip_grid, "a positive integer, typically 50")
        if not 0 <= self.max_shrink < 1:
            _fail("GPTQConfig", "max_shrink", self.max_shrink, "a fraction in [0, 1), typically 0.2")


@dataclass(frozen=True)
class AWQConfig:
    """AWQ options: points on the grid of the scale exponent a in s = mean|x|^a (/ mean|w|^(1-a)
    with duo scaling), and the clipping search (range shrunk by up to ``max_shrink``) before
    RTN. Under ``awq+gptq`` the weight is not clipped, since clipping the weight that GPTQ targets
    measured worse than no clipping; GPTQ's range search (``GPTQConfig.clip``, on with static
    groups) takes its place."""

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self) -> None:
        for name in ("grid", "clip_grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail("AWQConfig", name, value, "a positive integer, typically 20")
        if not 0 <= self.max_shrink < 1:
            _fail("AWQConfig", "max_shrink", self.max_shrink, "a fraction in [0, 1), typically 0.5")


@dataclass(frozen=True)
class LowRankConfig:
    """The 16-bit branch ``B A`` beside each quantized weight.

    ``method``: ``eora`` (error fitted in the activations' eigenspace; needs calibration),
    ``lorc`` (plain SVD of the error; data-free) or ``svdquant`` (smoothing, then the smoothed
    weight's top singular directions, the residual quantized). ``None`` picks eora when there is
    calibration text and lorc when there is none. ``alloc="energy"`` spreads the same parameter
    budget over the layers of each quantization stage by how much error each rank removes.
    ``dtype="int8"`` stores A and B with one float16 scale per row."""

    rank: int = 0
    method: LowRankMethod | None = None
    alloc: RankAllocation = "uniform"
    dtype: LowRankDtype = "float16"
    eora_damp: float = 0.01
    smooth_grid: int = 20

    def __post_init__(self) -> None:
        owner = "LowRankConfig"
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            _fail(owner, "rank", self.rank, "a non-negative integer (0: no low-rank branch)")
        if self.method is not None and self.method not in LOWRANK_METHODS:
            _fail(owner, "method", self.method, f"one of {', '.join(LOWRANK_METHODS)}")
        if self.alloc not in typing.get_args(RankAllocation):
            _fail(owner, "alloc", self.alloc, "uniform or energy")
        if self.alloc == "energy" and self.method == "svdquant":
            _fail(owner, "alloc", self.alloc, "svdquant fixes its rank before quantizing, so it has no error spectrum to allocate by; use uniform")
        if self.dtype not in typing.get_args(LowRankDtype):
            _fail(owner, "dtype", self.dtype, "float16 or int8")
        if not 0 < self.eora_damp <= 1:
            _fail(owner, "eora_damp", self.eora_damp, "a fraction in (0, 1], typically 0.01")
        if not isinstance(self.smooth_grid, int) or self.smooth_grid < 1:
            _fail(owner, "smooth_grid", self.smooth_grid, "a positive integer, typically 20")


@dataclass(frozen=True)
class PruneConfig:
    """Which weights are set to zero before quantization.

    ``pattern`` is ``unstructured`` (every output row loses the same number of weights,
    ``floor(sparsity * in_features)``) or ``N:M`` such as ``2:4`` (every M consecutive inputs of
    a row keep exactly N). N:M fixes the sparsity at ``1 - N/M``, so ``sparsity`` may be left
    None there; for unstructured it defaults to 0.5."""

    method: PruneMethod | None = None
    sparsity: float | None = None
    pattern: str = UNSTRUCTURED

    def __post_init__(self) -> None:
        owner = "PruneConfig"
        if self.method is not None and self.method not in PRUNE_METHODS:
            _fail(owner, "method", self.method, f"one of {', '.join(PRUNE_METHODS)}")
        n_m = self._parse_pattern()
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 <= self.sparsity < 1):
            _fail(owner, "sparsity", self.sparsity, "a fraction in [0, 1), e.g. 0.5 (1.0 would remove every weight)")
        if n_m is None:
            object.__setattr__(self, "sparsity", 0.5 if self.sparsity is None else float(self.sparsity))
        else:
            implied = 1 - n_m[0] / n_m[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                _fail(owner, "sparsity", self.sparsity, f"pattern {self.pattern} fixes the sparsity at {implied:g}; leave it out or give {implied:g}")
            object.__setattr__(self, "sparsity", implied)

    def _parse_pattern(self) -> tuple[int, int] | None:
        if self.pattern == UNSTRUCTURED:
            return None
        n_m = parse_n_m(self.pattern)
        if n_m is None:
            _fail("PruneConfig", "pattern", self.pattern, "unstructured or N:M such as 2:4 or 4:8")
        n, m = n_m
        if not 0 < n < m:
            _fail("PruneConfig", "pattern", self.pattern, "N:M keeps N of every M inputs, so 0 < N < M (e.g. 2:4)")
        return n, m

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def uses_calibration(self) -> bool:
        """Wanda and SparseGPT score weights by the calibration activations; magnitude does not."""
        return self.method in ("wanda", "sparsegpt")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        return self._parse_pattern()

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        shape = self.pattern if self.n_m else f"{self.sparsity:.0%} unstructured"
        return f"{self.method} {shape}"


@dataclass(frozen=True)
class CompressConfig:
    """One compression job. ``quant=None`` keeps weights in 16 bits (for passes that only prune)."""

    quant: QuantFormat | None = field(default_factory=QuantFormat)
    method: Method = "rtn"
    calib: CalibConfig = field(default_factory=CalibConfig)
    overrides: tuple[ModuleOverride, ...] = ()
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    act_bits: int | None = None
    # The activations' number format under act_bits: int, fp8_e4m3 or fp8_e5m2 (None: int, or FP4 weights' own FP4).
    act_kind: str | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    # A random Hadamard rotation of the residual stream first, with down_proj's input rotated online (QuaRot).
    rotate: bool = False

    def __post_init__(self) -> None:
        owner = "CompressConfig"
        if self.method not in METHODS:
            _fail(owner, "method", self.method, f"one of {', '.join(METHODS)}")
        if self.quant is None and self.method != "rtn":
            _fail(owner, "method", self.method, "a quantization method needs a format; with quant=None use method='rtn'")
        if self.quant is None and not self.prune.enabled:
            _fail(owner, "quant", None, "16-bit weights (--bits 16) with no pruning leave nothing to do: give a format, or a pruning method (--prune)")
        if self.lowrank.method is None:
            object.__setattr__(self, "lowrank", dataclasses.replace(self.lowrank, method="lorc" if self.calib.is_none else "eora"))
        if self.wants_lowrank and self.quant is None:
            _fail(owner, "lowrank", self.lowrank, "a low-rank branch corrects quantization error, so it needs a format (--bits)")
        if self.wants_lowrank and self.lowrank.method != "lorc" and self.calib.is_none:
            _fail(owner, "lowrank", self.lowrank, f"{self.lowrank.method} fits the branch on calibration activations: give calibration text, or use method lorc")
        if self.prune.uses_calibration and self.calib.is_none:
            _fail(owner, "prune", self.prune, f"{self.prune.method} scores weights by calibration activations: give calibration text, or prune by magnitude")
        if self.uses_svdquant and self.uses_awq:
            _fail(owner, "method", self.method, "SVDQuant's smoothing replaces AWQ's scaling: use rtn or gptq under svdquant")
        if self.act_bits is not None:
            if self.act_bits not in ACT_BITS:
                _fail(owner, "act_bits", self.act_bits, "4 or 8 (None keeps 16-bit activations)")
            if self.quant is None:
                _fail(owner, "act_bits", self.act_bits, "quantized activations need a weight format (--bits)")
        if self.act_kind is not None and self.act_bits is None:
            _fail(owner, "act_kind", self.act_kind, "an activation format needs --act-bits (8 for W8A8 / W4A8)")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.quant is not None:
            for override in self.overrides:
                # Builds the merged format now, so a bad combination fails before any work.
                override.apply(self.quant)

    def _override_for(self, module_name: str) -> ModuleOverride | None:
        return next((o for o in self.overrides if o.matches(module_name)), None)

    def is_target(self, module_name: str) -> bool:
        """Whether the module is compressed at all (quantized, pruned, or both)."""
        override = self._override_for(module_name)
        return not (override is not None and override.skip) and (self.quant is not None or self.prune.enabled)

    def format_for(self, module_name: str) -> QuantFormat | None:
        """The format a module gets, or None where its weight stays in 16 bits."""
        if self.quant is None:
            return None
        override = self._override_for(module_name)
        return self.quant if override is None else override.apply(self.quant)

    def rank_for(self, module_name: str) -> int:
        """The low-rank branch's rank for a module (0: none); the first matching override wins."""
        override = self._override_for(module_name)
        return self.lowrank.rank if override is None or override.rank is None else override.rank

    @property
    def wants_lowrank(self) -> bool:
        return self.lowrank.rank > 0 or any(o.rank for o in self.overrides) or self.lowrank.method == "svdquant"

    @property
    def uses_svdquant(self) -> bool:
        return self.lowrank.method == "svdquant"

    @property
    def needs_calibration(self) -> bool:
        return (self.method != "rtn" or (self.wants_lowrank and self.lowrank.method != "lorc")
                or self.prune.uses_calibration)

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq+gptq")

    @property
    def uses_awq(self) -> bool:
        return self.method in ("awq", "awq+gptq")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> CompressConfig:
        return cls.from_dict(json.loads(text))


def _from_dict(cls: type, data: Any) -> Any:
    """Rebuild a (nested) config dataclass from plain JSON data, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {name: _convert(hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value)
    if origin is tuple:
        return tuple(_convert(args[0], item) for item in value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if dataclasses.is_dataclass(arg):
                return _from_dict(arg, value)
        return value
    return value

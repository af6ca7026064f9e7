"""The records that flow through passes: a ``Target`` (one module and the passes that apply to
it) and a ``LayerState`` (its tensors as each pass leaves them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..actformat import ActFormat
from ..config import QuantFormat
from ..errors import ConfigError
from ..formats import QuantizedWeight
from ..methods.lowrank import LowRank
from .options import PassConfig


@dataclass(frozen=True)
class Target:
    """One Linear layer the recipe compresses. ``configs[i]`` is recipe pass ``i``'s config for
    this module (its overrides applied), or None where that pass leaves it alone. ``fmt`` is the
    format its weight is stored in (None: it stays in 16 bits, pruned only)."""

    name: str
    block: int
    local_name: str
    configs: tuple[PassConfig | None, ...] = ()
    fmt: QuantFormat | None = None
    act_format: ActFormat | None = None
    split_rank: int = 0  # the rank of a branch split off before quantization (SVDQuant)
    expert: int | None = None  # the expert of a mixture-of-experts layer it belongs to
    notes: tuple[str, ...] = ()  # what planning changed for it (a pass fitted to its size)

    def config(self, index: int) -> PassConfig | None:
        return self.configs[index] if index < len(self.configs) else None


@dataclass
class ColumnPrune:
    """Pruning handed to a later pass's column loop (SparseGPT's mask chosen inside GPTQ)."""

    sparsity: float
    n_m: tuple[int, int] | None


@dataclass
class LayerState:
    """One layer between passes, in the space its weight is compressed in (``smooth`` applied).

    ``target_weight`` is what the layer should compute with overall; ``weight`` is what is left
    for the passes still to come (SVDQuant's residual after its split); ``approximation`` is the
    float32 matrix the stored codes (or the pruned 16-bit weight) represent."""

    target: Target
    original: Tensor  # the float32 weight as the module held it, for the report
    weight: Tensor
    target_weight: Tensor
    hessian: Tensor | None
    smooth: Tensor | None = None
    act_abs_max: Tensor | None = None  # per input channel, where a pass asked for it (static activation scales)
    act_scale: Tensor | None = None  # the static activation scale a quantize pass chose
    mask: Tensor | None = None  # True where a weight is kept
    compact_pattern: str | None = None  # "N:M" when the mask is stored compact
    column_prune: ColumnPrune | None = None
    quantized: QuantizedWeight | None = None
    approximation: Tensor | None = None
    branch: LowRank | None = None
    branch_dtype: str = "float16"
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fmt(self) -> QuantFormat | None:
        return self.target.fmt

    def note(self, text: str) -> None:
        if text:
            self.notes.append(text)

    def computed_weight(self) -> Tensor:
        """The float32 weight the layer computes with, on unsmoothed inputs."""
        approximation = self.weight if self.approximation is None else self.approximation
        computed = approximation + self.branch.matrix() if self.branch is not None and self.branch.rank else approximation
        return computed / self.smooth if self.smooth is not None else computed


def column_batches(layers: Sequence[tuple[LayerState, PassConfig]]) -> list[list[tuple[LayerState, PassConfig]]]:
    """Consecutive layers a column loop (GPTQ, SparseGPT) can process as one stacked matrix: the
    same options, the same H (hence the same inverse and act-order permutation), the same format,
    and no per-tensor global scale to keep apart. The loop treats rows independently, so stacking
    changes nothing but the column steps."""
    batches: list[list[tuple[LayerState, PassConfig]]] = []
    for state, config in layers:
        previous = batches[-1][-1] if batches else None
        joinable = (previous is not None and config == previous[1] and state.fmt == previous[0].fmt
                    and (state.fmt is None or state.fmt.kind != "nvfp4") and state.column_prune == previous[0].column_prune
                    and state.hessian is not None and state.hessian is previous[0].hessian)
        if joinable:
            batches[-1].append((state, config))
        else:
            batches.append([(state, config)])
    return batches


def merged_declarations(configs: tuple[PassConfig | None, ...], name: str) -> dict[str, Any]:
    """What the passes applying to a module declare about it; two passes declaring one fact clash."""
    merged: dict[str, Any] = {}
    owners: dict[str, int] = {}
    for index, config in enumerate(configs):
        if config is None:
            continue
        for key, value in config.declare().items():
            if key in merged:
                raise ConfigError(f"recipe passes[{owners[key]}] ({configs[owners[key]].kind_name()}) and passes[{index}] "
                                  f"({config.kind_name()}) both apply to {name} and both set its {key}: give each module one such "
                                  f"pass (narrow their targets, or add an override with skip: true to one)")
            merged[key], owners[key] = value, index
    for index, config in enumerate(configs):
        missing = [] if config is None else [fact for fact in config.requires() if fact not in merged]
        if missing:
            raise ConfigError(f"recipe passes[{index}] ({config.kind_name()}) applies to {name}, but no pass sets its "
                              f"{', '.join(missing)}: add a quantize pass that targets it, or skip it in this pass")
    return merged

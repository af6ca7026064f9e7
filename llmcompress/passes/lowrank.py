"""The ``lowrank`` pass: a 16-bit branch ``B A`` beside each quantized weight. LoRC and EoRA fit
it to the error the earlier passes left (EoRA in the activations' eigenspace); SVDQuant splits
the smoothed weight's top singular directions off before quantization, so the quantizer sees
only the residual."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import LOWRANK_METHODS, LowRankConfig, LowRankDtype, LowRankMethod, RankAllocation
from ..errors import ConfigError
from ..methods.lowrank import Eigenbasis, allocate_ranks, eigenbasis, eora, error_spectrum, lorc, svdquant_split
from ..stats import HESSIAN
from .base import Pass, register
from .options import PassConfig, check_choice
from .state import LayerState


@dataclasses.dataclass(frozen=True)
class LowRankPassConfig(PassConfig):
    """``method``: eora (needs calibration), lorc (data-free) or svdquant (split before the
    quantizer; pair it with a ``smooth`` pass of method svdquant). ``rank``: the branch's rank.
    ``alloc="energy"`` spreads the same parameter budget over a stage's layers by how much error
    each rank removes. ``dtype="int8"`` stores A and B with one float16 scale per row."""

    method: LowRankMethod = "eora"
    rank: int = 32
    alloc: RankAllocation = "uniform"
    dtype: LowRankDtype = "float16"
    eora_damp: float = 0.01

    def __post_init__(self) -> None:
        check_choice("lowrank", "method", self.method, LOWRANK_METHODS)
        check_choice("lowrank", "alloc", self.alloc, typing.get_args(RankAllocation))
        LowRankConfig(rank=self.rank, method=self.method, alloc=self.alloc, dtype=self.dtype, eora_damp=self.eora_damp)

    @property
    def splits(self) -> bool:
        return self.method == "svdquant"

    @property
    def needs_calibration(self) -> bool:
        return self.method != "lorc"

    def statistics(self) -> frozenset[str]:
        return frozenset({HESSIAN}) if self.method == "eora" else frozenset()

    def declare(self) -> dict[str, Any]:
        return {"split_rank": self.rank} if self.splits else {}

    def requires(self) -> tuple[str, ...]:
        return ("fmt",)

    def check_module(self, name: str, in_features: int, out_features: int) -> None:
        if self.rank > min(in_features, out_features):
            raise ConfigError(f"low-rank rank {self.rank} is larger than {name}'s smaller side ({out_features}x{in_features}, so at most "
                              f"{min(in_features, out_features)}): use a smaller --lowrank, or an override with a smaller rank for this module")

    def fitted(self, in_features: int, out_features: int) -> tuple[PassConfig | None, str]:
        return None, f"no {self.method} branch: rank {self.rank} exceeds this {out_features}x{in_features} layer's smaller side"

    def label(self) -> str:
        return self.method

    def describe(self) -> str:
        return f"{self.method} rank {self.rank}" + (f" ({self.alloc})" if self.alloc != "uniform" else "")

    def report_labels(self) -> dict[str, Any]:
        return {"branch": f"{self.method} r{self.rank}", "rank": self.rank, "lowrank_method": self.method}


@register
class LowRankPass(Pass):
    kind = "lowrank"
    config_class = LowRankPassConfig
    after = ("quantize",)

    def layers_independent(self, configs: Sequence[LowRankPassConfig | None]) -> bool:
        return not any(config is not None and config.alloc == "energy" for config in configs)

    def prepare(self, layers: Sequence[tuple[LayerState, LowRankPassConfig]]) -> None:
        for state, config in layers:
            if config.splits:
                state.branch, state.weight = svdquant_split(state.weight, config.rank)

    def apply(self, layers: Sequence[tuple[LayerState, LowRankPassConfig]]) -> None:
        for state, config in layers:
            state.branch_dtype = config.dtype
            state.methods.append(config.method)
        fitted = [(state, config) for state, config in layers if not config.splits]
        if fitted:
            _fit_error_branches(fitted)


def _fit_error_branches(layers: list[tuple[LayerState, LowRankPassConfig]]) -> None:
    """LoRC or EoRA on each layer's remaining error, at its rank or one allocated by energy."""
    bases: list[tuple[Tensor, Eigenbasis]] = []  # one eigendecomposition per distinct H

    def basis(state: LayerState, config: LowRankPassConfig) -> Eigenbasis | None:
        if config.method != "eora" or state.hessian is None:
            return None
        for hessian, found in bases:
            if hessian is state.hessian:
                return found
        bases.append((state.hessian, eigenbasis(state.hessian, config.eora_damp)))
        return bases[-1][1]

    errors = [state.target_weight - state.approximation for state, _ in layers]
    ranks = [config.rank for _, config in layers]
    if any(config.alloc == "energy" for _, config in layers):
        ranks = _energy_ranks(layers, errors, basis)
    for (state, config), error, rank in zip(layers, errors, ranks, strict=True):
        fitted_basis = basis(state, config)
        state.branch = eora(error, fitted_basis, rank) if fitted_basis is not None else lorc(error, rank)


def _energy_ranks(layers: list[tuple[LayerState, LowRankPassConfig]], errors: list[Tensor], basis) -> list[int]:  # noqa: ANN001
    """The stage's parameter budget (each layer's rank times its side lengths) spread by how much
    relative error each rank removes."""
    names = [state.target.name for state, _ in layers]
    spectra, costs, limits = {}, {}, {}
    for name, (state, config), error in zip(names, layers, errors, strict=True):
        weight = state.target_weight
        hessian = state.hessian if config.method == "eora" else None
        reference = float(((weight @ hessian) * weight).sum()) if hessian is not None else float(weight.square().sum())
        spectra[name] = error_spectrum(error, basis(state, config)) / max(reference, torch.finfo(torch.float32).tiny)
        costs[name] = sum(weight.shape)
        limits[name] = min(weight.shape)
    budget = sum(config.rank * costs[name] for name, (_, config) in zip(names, layers, strict=True))
    allocated = allocate_ranks(spectra, costs, budget, limits)
    return [allocated[name] for name in names]

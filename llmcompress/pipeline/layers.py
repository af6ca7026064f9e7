"""One stage's layers, as tensors: the recipe's layer passes run over their states in order.

Every layer pass first ``prepare``s (SVDQuant's split), then each ``apply``s, in recipe order;
a pass sees only the layers it targets, each with its own (override-merged) config. No module
is touched here: the driver reads the weights and statistics out of the block, builds the
states, and installs what the passes leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..passes import LayerState, Pass, Target


def layer_states(targets: Sequence[Target], weights: Sequence[Tensor], hessians: Sequence[Tensor | None],
                 smooths: Sequence[Tensor | None], maxima: Sequence[Tensor | None] | None = None) -> list[LayerState]:
    """The states in the space each weight is compressed in: a smoothing kept inside the layer
    multiplies the weight's columns and divides H (layers sharing H and smoothing share the result,
    which is how a column loop stacks them and EoRA decomposes H once) and the inputs' maxima."""
    smoothed: list[tuple[Tensor, Tensor, Tensor]] = []
    states = []
    maxima = [None] * len(targets) if maxima is None else maxima
    for target, original, hessian, smooth, maximum in zip(targets, weights, hessians, smooths, maxima, strict=True):
        weight = original.float()
        if smooth is not None:
            weight = weight * smooth
            if hessian is not None:
                hessian = _smoothed_hessian(hessian, smooth, smoothed)
            if maximum is not None:
                maximum = maximum / smooth
        states.append(LayerState(target=target, original=original, weight=weight, target_weight=weight,
                                 hessian=hessian, smooth=smooth, act_abs_max=maximum))
    return states


def _smoothed_hessian(hessian: Tensor, smooth: Tensor, cache: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    for known_hessian, known_smooth, result in cache:
        if known_hessian is hessian and known_smooth is smooth:
            return result
    cache.append((hessian, smooth, hessian / torch.outer(smooth, smooth)))
    return cache[-1][2]


def run_layer_passes(states: list[LayerState], passes: Sequence[Pass]) -> None:
    """Every layer pass over the states it targets: all ``prepare``s, then all ``apply``s."""
    work = [(p, [(s, s.target.config(p.index)) for s in states if s.target.config(p.index) is not None]) for p in passes]
    for layer_pass, layers in work:
        if layers:
            layer_pass.prepare(layers)
    for layer_pass, layers in work:
        if layers:
            layer_pass.apply(layers)

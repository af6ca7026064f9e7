"""Mixture-of-experts layers as one ``nn.Linear`` per expert projection.

transformers 5 stores a block's experts as fused 3-D parameters (``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I], transposed in GPT-OSS and Llama 4). Every pass
works on ``nn.Linear`` layers and the statistics hooks see a Linear's inputs, so the fused
module is replaced by an ``ExpertList`` of ``ExpertMLP``s holding the same numbers: each
expert's projections are then weights like any other, and each sees exactly the tokens routed
to it. The module names (``experts.3.gate_proj``) are those of the per-expert checkpoints that
transformers writes and vLLM reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import EXPERT_CALIBRATION
from .errors import ModelError

ROUTED, EVERY_TOKEN = EXPERT_CALIBRATION


@dataclass(frozen=True)
class FusedLayout:
    """How one fused experts module lays out its weights."""

    transposed: bool  # [E, in, out] instead of nn.Linear's [E, out, in]
    concatenated: bool  # gate_up holds [gate; up] rather than interleaved gate0, up0, gate1, ...
    has_gate: bool  # gate_up_proj (gated MLP) rather than up_proj alone
    has_bias: bool

    @property
    def fused_input(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def fused_layout(module: nn.Module) -> FusedLayout | None:
    """The layout of a fused experts module (3-D ``down_proj`` beside a 3-D ``gate_up_proj`` or
    ``up_proj``), or None for any other module."""
    down = module._parameters.get("down_proj")
    has_gate = "gate_up_proj" in module._parameters
    first = module._parameters.get("gate_up_proj" if has_gate else "up_proj")
    if down is None or first is None or down.dim() != 3 or first.dim() != 3:
        return None
    if getattr(module, "has_post_expert_norm", False):
        raise ModelError(f"{type(module).__name__} normalises each expert's output, which llmcompress does not model yet: "
                         "compress this model with its experts skipped (ignore: ['experts'])")
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        # Classes without transformers' experts decorator (Llama 4) say it only through their shapes.
        hidden = getattr(module, "hidden_size", None) or getattr(module, "hidden_dim", None)
        # down_proj is [E, H, I] or [E, I, H]; gate_up_proj [E, 2I, H] or [E, H, 2I]: whichever tells them apart.
        telling = next((p for p in (down, first) if (p.shape[1] == hidden) != (p.shape[2] == hidden)), None)
        if hidden is None or telling is None:
            raise ModelError(f"cannot tell how {type(module).__name__} lays out its experts ({tuple(first.shape)}): "
                             "expected [experts, out, in] or [experts, in, out] with the hidden size on one side")
        transposed = (telling.shape[2] == hidden) if telling is down else (telling.shape[1] == hidden)
    return FusedLayout(transposed=bool(transposed), concatenated=bool(getattr(module, "is_concatenated", True)), has_gate=has_gate,
                       has_bias=f"{'gate_up_proj' if has_gate else 'up_proj'}_bias" in module._parameters)


def split_gate_up(layout: FusedLayout, fused: Tensor) -> tuple[Tensor, Tensor]:
    """One expert's gate and up rows out of its fused [2I, ...] rows (a weight, or a bias)."""
    if layout.concatenated:
        return fused.chunk(2, dim=0)
    return fused[0::2], fused[1::2]


def join_gate_up(layout: FusedLayout, gate: Tensor, up: Tensor) -> Tensor:
    """The inverse of ``split_gate_up`` along the last dimension (activations)."""
    if layout.concatenated:
        return torch.cat([gate, up], dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


# Which Linears of an expert each fused tensor holds.
FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",), "down_proj": ("down_proj",)}


def expert_tensors(layout: FusedLayout, fused_name: str, tensor: Tensor) -> dict[str, Tensor]:
    """One expert's slice of one fused tensor (``gate_up_proj[e]``, ``down_proj_bias[e]``, ...) as
    that expert's Linear tensors (``gate_proj.weight``, ``up_proj.weight``, ...)."""
    is_bias = fused_name.endswith("_bias")
    parts = FUSED_PARTS[fused_name.removesuffix("_bias")]
    if layout.transposed and not is_bias:
        tensor = tensor.T
    pieces = split_gate_up(layout, tensor) if len(parts) == 2 else (tensor,)
    return {f"{part}.{'bias' if is_bias else 'weight'}": piece.contiguous() for part, piece in zip(parts, pieces, strict=True)}


def fused_name_of(layout: FusedLayout, part: str) -> str:
    """The fused tensor holding an expert's ``part`` (``up_proj.bias`` -> ``gate_up_proj_bias``)."""
    projection, _, kind = part.partition(".")
    fused = "down_proj" if projection == "down_proj" else layout.fused_input
    return fused + ("_bias" if kind == "bias" else "")


class ExpertMLP(nn.Module):
    """One expert: ``gate_proj`` (gated MLPs), ``up_proj``, ``down_proj``."""

    def __init__(self, hidden: int, intermediate: int, has_gate: bool, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if has_gate:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)

    def forward(self, x: Tensor, activate: Callable[[Tensor | None, Tensor], Tensor], token_weights: Tensor | None = None) -> Tensor:
        gate = _weighted_call(self.gate_proj, x, token_weights) if hasattr(self, "gate_proj") else None
        hidden = activate(gate, _weighted_call(self.up_proj, x, token_weights))
        return _weighted_call(self.down_proj, hidden, token_weights)


def _weighted_call(linear: nn.Module, x: Tensor, token_weights: Tensor | None) -> Tensor:
    """Call ``linear`` with the router weight of each input row visible to statistics hooks, which
    weight the row's share of H by it (the expert's output is scaled by that weight)."""
    linear.token_weights = token_weights
    try:
        return linear(x)
    finally:
        linear.token_weights = None


class ExpertList(nn.ModuleList):
    """A block's experts as ``ExpertMLP``s, computing what the fused module computed.

    Called like transformers' experts modules: ``(hidden [T, H], top_k_index [T, K],
    top_k_weights [T, K])``, each expert running on the tokens routed to it; or, as Llama 4's,
    ``(routed [E * T, H])``, expert e's rows already scaled by its router score (0 where the
    token is not routed to it). ``calibration``: ``routed`` (each expert sees its own tokens), or
    ``all`` (every expert also runs on every token, so its statistics cover them all, while the
    output still follows the routing)."""

    def __init__(self, experts: list[ExpertMLP], layout: FusedLayout, gate: Callable[[Tensor], Tensor],
                 source: str) -> None:
        super().__init__(experts)
        self.layout = layout
        self.source = source  # the fused module's class, for messages
        self.apply_gate = gate  # the fused module's activation on [gate | up] as it laid them out
        self.calibration = ROUTED

    @classmethod
    def from_fused(cls, fused: nn.Module, layout: FusedLayout) -> ExpertList:
        first = fused._parameters[layout.fused_input]
        down = fused._parameters["down_proj"]
        count = down.shape[0]
        hidden, intermediate = (down.shape[2], down.shape[1]) if layout.transposed else (down.shape[1], down.shape[2])
        experts = [ExpertMLP(hidden, intermediate, layout.has_gate, layout.has_bias, first.dtype, first.device) for _ in range(count)]
        if not first.is_meta:
            with torch.no_grad():
                for fused_name, tensor in fused._parameters.items():
                    for index, expert in enumerate(experts):
                        for name, piece in expert_tensors(layout, fused_name, tensor.detach()[index]).items():
                            expert.get_parameter(name).copy_(piece)
        for name in list(fused._parameters):
            del fused._parameters[name]  # the per-expert copies replace them; keep only the activation
        return cls(experts, layout, _gate_function(fused, layout), type(fused).__name__)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor | None = None, top_k_weights: Tensor | None = None) -> Tensor:
        if top_k_index is None:
            return self._scaled_forward(hidden_states)
        output = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            tokens, slots = torch.where(top_k_index == index)
            if tokens.numel() == 0 and self.calibration == ROUTED:
                continue
            weights = top_k_weights[tokens, slots]
            if self.calibration == EVERY_TOKEN:
                out = expert(hidden_states, self._activate)[tokens]
            else:
                out = expert(hidden_states[tokens], self._activate, weights)
            output.index_add_(0, tokens, (out * weights[:, None]).to(output.dtype))
        return output

    def _scaled_forward(self, routed: Tensor) -> Tensor:
        rows = routed.view(len(self), -1, routed.shape[-1])
        output = torch.zeros_like(rows)
        for index, expert in enumerate(self):
            chunk = rows[index]
            # A token not routed here arrives as a zero row (its input is already scaled by its router
            # score), and a bias-free expert maps it to zero; ``calibration='all'`` cannot apply here.
            tokens = chunk.any(dim=-1).nonzero()[:, 0]
            if tokens.numel():
                output[index, tokens] = expert(chunk[tokens], self._activate).to(output.dtype)
        return output.view(-1, routed.shape[-1])

    def _activate(self, gate: Tensor | None, up: Tensor) -> Tensor:
        return self.apply_gate(up if gate is None else join_gate_up(self.layout, gate, up))

    def extra_repr(self) -> str:
        return f"from {self.source}, calibration={self.calibration}"


def _gate_function(fused: nn.Module, layout: FusedLayout) -> Callable[[Tensor], Tensor]:
    """The fused module's activation of [gate | up] (GPT-OSS's clamped SwiGLU, or act(gate) * up)."""
    custom = getattr(fused, "_apply_gate", None)
    if custom is not None and layout.has_gate:
        return custom
    act = getattr(fused, "act_fn", None)
    if act is None:
        raise ModelError(f"{type(fused).__name__} has neither _apply_gate nor act_fn: cannot tell its experts' activation")
    if not layout.has_gate:
        return act

    def gated(gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return gated


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by an ``ExpertList`` (in place, on whatever
    device its tensors are, meta included); returns the names of the replaced modules."""
    replaced = []
    for name, module in list(model.named_modules()):
        layout = fused_layout(module)
        if layout is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ExpertList.from_fused(module, layout))
        replaced.append(name)
    return replaced


def set_expert_calibration(model: nn.Module, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, ExpertList):
            module.calibration = mode


def expert_index(name: str, model: nn.Module) -> int | None:
    """The expert a module name lies in (``...experts.3.down_proj`` -> 3), None outside experts."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        if parts[depth].isdigit():
            try:
                parent = model.get_submodule(".".join(parts[:depth]))
            except AttributeError:
                return None
            if isinstance(parent, ExpertList):
                return int(parts[depth])
    return None

"""Rewriting a transformers model into the layers every pass works on, computing the same outputs:
fused experts become one ``nn.Linear`` per expert projection (``experts``), and GPT-2's ``Conv1D``
(a Linear with its weight stored [in, out]) becomes an ``nn.Linear``. Every path that builds a
model for compression or loading calls ``standard_layers`` once."""

from __future__ import annotations

import torch
from torch import nn

from .experts import unfuse_experts


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` (transformers' GPT-2 layer) by an ``nn.Linear`` holding W^T;
    returns the names replaced, which ``stored_transposed`` remembers."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        weight = module.weight
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, dtype=weight.dtype, device=weight.device)
        if not weight.is_meta:
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced.append(name)
    if replaced:
        # Compression replaces the Linears themselves; the model remembers how its checkpoints store them.
        model.llmcompress_transposed = {f"{name}.weight" for name in replaced}
    return replaced


def standard_layers(model: nn.Module) -> nn.Module:
    """``model`` with per-expert Linears and no Conv1D, in place (a second call changes nothing)."""
    unfuse_experts(model)
    linearize_conv1d(model)
    return model


def stored_transposed(model: nn.Module) -> set[str]:
    """The weights the model's checkpoints store [in, out] (those that were ``Conv1D``s)."""
    return set(getattr(model, "llmcompress_transposed", ()))

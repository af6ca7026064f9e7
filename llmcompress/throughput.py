"""How fast a forward pass computes, against what this machine's matmul can do.

Work is counted as a dense transformer's: 2 FLOPs per weight of every linear layer (compressed
ones at their logical shape) per token, plus causal attention's score and value products,
2 x 2 x hidden x (seqlen / 2) per token per block. Norms, activations and the softmax are left
out, so the achieved rate is a slight underestimate.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PEAK_SHAPE = (2048, 576, 1536)  # M, K, N: a SmolLM2 MLP projection over 2048 tokens


def linear_weights(model: nn.Module) -> int:
    """Weights in the model's matrix products: every layer with ``in_features`` and ``out_features``."""
    return sum(module.in_features * module.out_features for module in model.modules()
               if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int))


def forward_flops(model: nn.Module, windows: int, seqlen: int) -> float:
    """FLOPs of scoring ``windows`` windows of ``seqlen`` tokens (see the module's counting)."""
    config = model.config
    attention = 2 * 2 * config.hidden_size * (seqlen / 2) * config.num_hidden_layers
    return windows * seqlen * (2 * linear_weights(model) + attention)


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` torch.mm calls of ``PEAK_SHAPE`` in ``dtype`` on ``device``."""
    m, k, n = PEAK_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)  # the first call pays for kernel selection and allocation
    best = float("inf")
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best / 1e9

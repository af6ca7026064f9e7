"""The dtype forward passes compute in, and running a model in it without changing what it stores.

A float16 checkpoint computed in float16 on a CPU crawls: CPUs have no float16 matrix units, and
torch multiplies float16 matrices at a thirtieth of its float32 speed (1.6 against 45 GFLOP/s on
an AMD EPYC, 2 threads), while CPUs with AVX512-BF16 or AMX reach twice float32 in bfloat16
(97 GFLOP/s). So forwards on a CPU compute in bfloat16 where the CPU has it natively and in
float32 otherwise, while the weights that are compressed and saved stay in the stored dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn

from .config import COMPUTE_DTYPES
from .nn import dequantized_weights


@cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN reports it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(stored: torch.dtype, device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """The dtype to run forwards in: ``requested`` unless it is ``auto``; ``auto`` keeps the stored
    dtype on an accelerator and on CPU for float32 (never less precise than stored there), and
    computes 16-bit models on a CPU in bfloat16 where it is native, else in float32."""
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {requested!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if requested != "auto":
        return getattr(torch, requested)
    if torch.device(device).type != "cpu" or stored not in (torch.float16, torch.bfloat16):
        return stored
    return torch.bfloat16 if native_bfloat16() else torch.float32


@contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, ``model``'s floating parameters are copies in ``dtype``; on exit the very
    tensors it had come back, so nothing a float16 model stores is rounded through bfloat16.
    Buffers are left alone: a model's computed buffers (rotary frequencies) stay float32 as
    ``from_pretrained`` makes them, and packed weights are dequantized for the input's dtype."""
    originals: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}  # tied weights stay one tensor
    try:
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is None or not parameter.is_floating_point() or parameter.dtype == dtype:
                    continue
                originals.append((module, name, parameter))
                if id(parameter) not in copies:
                    copies[id(parameter)] = nn.Parameter(parameter.detach().to(dtype), requires_grad=False)
                module._parameters[name] = copies[id(parameter)]
        yield
    finally:
        for module, name, parameter in originals:
            module._parameters[name] = parameter


@contextmanager
def forward_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Everything ``model``'s forwards read, in ``dtype``, for many forwards: packed weights are
    dequantized once from their stored scales, the other parameters are cast copies."""
    with dequantized_weights(model, dtype), computing_in(model, dtype):
        yield

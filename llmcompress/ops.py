"""The ops ``CompressedLinear`` calls. Dispatch lives here and only here.

The reference path dequantizes in PyTorch and runs anywhere; it is the definition every
accelerated kernel must reproduce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import QuantFormat
from .formats import dequantize
from .packing import unpack_weight


def dequantize_packed(tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, dtype: torch.dtype) -> Tensor:
    """The [N, K] weight that one layer's packed tensors represent, in ``dtype``."""
    return dequantize(unpack_weight(tensors, fmt, in_features), fmt, dtype)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x W^T + b with an already dequantized W, the bias cast to the input's dtype."""
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quantized_linear_reference(
    x: Tensor, tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, bias: Tensor | None
) -> Tensor:
    return dense_linear(x, dequantize_packed(tensors, fmt, in_features, x.dtype), bias)


def quantized_linear(x: Tensor, tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, bias: Tensor | None) -> Tensor:
    """y = x W^T + b for a packed W. CUDA kernels plug in here (see kernels/)."""
    return quantized_linear_reference(x, tensors, fmt, in_features, bias)

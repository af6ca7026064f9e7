"""The ops ``CompressedLinear`` calls. Dispatch lives here and only here.

The reference path dequantizes in PyTorch and runs anywhere; it is the definition every
accelerated kernel must reproduce: ``y = Q(W) q_a(x') + B (A x') + b`` with ``x' = x / smooth``
where the layer keeps a smoothing vector, and ``q_a`` the activation quantization of W4A4
layers (identity otherwise).

On CUDA tensors, 4-bit layers run the fused kernels of ``kernels/`` (``llmcompress.cuda``)
when CuPy is installed and the layer is one they cover; anything else runs the reference, with
a one-line notice the first time each reason comes up.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .config import QuantFormat
from .actformat import fake_quantize_activations
from .formats import dequantize
from .hadamard import HadamardTransform
from .packing import LayerLayout, unpack_branch, unpack_sparse_values, unpack_weight


def dequantize_packed(tensors: dict[str, Tensor], fmt: QuantFormat | None, in_features: int, dtype: torch.dtype,
                      layout: LayerLayout = LayerLayout()) -> Tensor:
    """The [N, K] weight that one layer's packed tensors represent, in ``dtype`` (``fmt=None``:
    a 16-bit N:M sparse weight)."""
    if fmt is None:
        return unpack_sparse_values(tensors, in_features, dtype)
    return dequantize(unpack_weight(tensors, fmt, in_features, layout), fmt, dtype)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x W^T + b with an already dequantized W, the bias cast to the input's dtype."""
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def compressed_linear_reference(x: Tensor, weight: Tensor, tensors: dict[str, Tensor], layout: LayerLayout, bias: Tensor | None) -> Tensor:
    """The whole layer given its dequantized low-bit weight (in x's dtype, float32 for quantized
    activations: ``weight_dtype``)."""
    if layout.input_hadamard:
        x = input_rotation(x.shape[-1], layout.input_hadamard).apply(x)
    if layout.smoothed:
        x = x / tensors["smooth_scale"].to(x.dtype)
    if layout.act_format is None:
        y = dense_linear(x, weight, bias)
    else:
        quantized = fake_quantize_activations(x.float(), layout.act_format, tensors.get("input_scale"))
        y = dense_linear(quantized, weight.float(), bias).to(x.dtype)
    if layout.rank:
        a, b = unpack_branch(tensors, x.dtype)
        y = y + (x @ a.T) @ b.T
    return y


@functools.lru_cache(maxsize=64)
def input_rotation(in_features: int, order: int) -> HadamardTransform:
    """The plain Hadamard of a layer's online rotation, built once per shape."""
    return HadamardTransform(in_features, block_size=None if order == in_features else order)


_NOTICES: set[str] = set()


def _notice(reason: str) -> None:
    if reason not in _NOTICES:
        _NOTICES.add(reason)
        warnings.warn(f"llmcompress: fused CUDA kernel not used ({reason}); running the PyTorch reference", stacklevel=3)


def _prepacked(tensors: dict[str, Tensor], fmt: QuantFormat, in_features: int, layout: LayerLayout, x: Tensor,
               cache: dict) -> object | None:
    """The layer in kernel layout for x's device and dtype (cached), or None with a notice."""
    from .cuda import launch, prepack

    key = (x.device, x.dtype)
    if key not in cache:
        try:
            launch.check_device(x.device)
            launch.check_cupy()
            cache[key] = prepack.prepack(tensors, fmt, in_features, layout, x.dtype)
        except (prepack.Unsupported, launch.KernelUnavailable) as reason:
            cache[key] = str(reason)
    entry = cache[key]
    if isinstance(entry, str):
        _notice(entry)
        return None
    return entry


def quantized_linear(x: Tensor, tensors: dict[str, Tensor], fmt: QuantFormat | None, in_features: int, bias: Tensor | None,
                     layout: LayerLayout = LayerLayout(), kernel_cache: dict | None = None) -> Tensor:
    """The layer's output for a packed W: the fused kernel on CUDA where it applies, else the
    reference. ``kernel_cache`` keeps the prepacked layout per (device, dtype) between calls."""
    if x.is_cuda and fmt is not None:
        pk = _prepacked(tensors, fmt, in_features, layout, x, {} if kernel_cache is None else kernel_cache)
        if pk is not None:
            from .cuda import launch

            return launch.linear(x, pk, None if bias is None else bias.to(x.dtype))
    weight = dequantize_packed(tensors, fmt, in_features, weight_dtype(layout, x.dtype), layout)
    return compressed_linear_reference(x, weight, tensors, layout, bias)


def weight_dtype(layout: LayerLayout, dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's dequantized weight is kept in for inputs of ``dtype``: float32 where
    the activations are quantized, so that the product is the integer (or FP8) GEMM's, exact up
    to float32 accumulation, as the engines compute it, not one rounded through bfloat16 twice."""
    return torch.float32 if layout.act_format is not None else dtype

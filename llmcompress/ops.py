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

import warnings

import torch
from torch import Tensor

from .config import QuantFormat
from .formats import dequantize, fake_quantize
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
    """The whole layer given its dequantized low-bit weight (in x's dtype)."""
    if layout.smoothed:
        x = x / tensors["smooth_scale"].to(x.dtype)
    main_input = x if layout.act_format is None else fake_quantize(x, layout.act_format)
    y = dense_linear(main_input, weight, bias)
    if layout.rank:
        a, b = unpack_branch(tensors, x.dtype)
        y = y + (x @ a.T) @ b.T
    return y


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
    return compressed_linear_reference(x, dequantize_packed(tensors, fmt, in_features, x.dtype, layout), tensors, layout, bias)

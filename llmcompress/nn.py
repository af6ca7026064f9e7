"""``CompressedLinear``: a drop-in replacement for ``nn.Linear`` holding a packed weight."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .actformat import ActFormat
from .config import QuantFormat
from .formats import QuantizedWeight
from .methods.lowrank import LowRank
from .ops import compressed_linear_reference, dequantize_packed, quantized_linear, weight_dtype
from .packing import LayerLayout, pack_branch, pack_sparse_values, pack_weight, packed_spec


class CompressedLinear(nn.Module):
    """A linear layer whose weight is stored packed (codes, scales, zero points), optionally with
    a 16-bit low-rank branch, a smoothing vector, quantized activations and N:M sparse storage
    (``LayerLayout``). ``fmt=None`` is a 16-bit weight stored N:M sparse (pruning alone).

    The packed tensors are buffers, so they travel with ``state_dict`` and ``.to(device)``;
    ``.to(dtype)`` / ``.half()`` leave them untouched (a dtype cast of a packed scale would
    silently change the weight), and convert only the bias.
    """

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | None, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, has_g_idx: bool = False,
                 layout: LayerLayout = LayerLayout()) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.has_g_idx = has_g_idx
        self.layout = layout
        spec = packed_spec(fmt, out_features, in_features, has_g_idx, layout)
        self.packed_names = tuple(spec)
        for name, (shape, tensor_dtype) in spec.items():
            self.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._dequantized: Tensor | None = None
        # The fused kernel's layout of the packed tensors, per (device, dtype), built on first use.
        self._kernel_cache: dict = {}

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, fmt: QuantFormat, bias: Tensor | None, branch: LowRank | None = None,
                       lowrank_dtype: str = "float16", smooth: Tensor | None = None, act_format: ActFormat | None = None,
                       sparsity: str | None = None, mask: Tensor | None = None, input_hadamard: int = 0,
                       act_scale: Tensor | None = None) -> CompressedLinear:
        """The layer for a quantized weight, plus a branch ``b @ a`` on its (smoothed) inputs;
        with ``sparsity="N:M"`` only the codes ``mask`` keeps are stored; ``input_hadamard``: the
        order of the Hadamard its input is rotated by first (0: none); ``act_scale``: the calibrated
        per-tensor scale of a static activation format."""
        out_features, in_features = q.shape
        rank = 0 if branch is None else branch.rank
        layout = LayerLayout(rank=rank, lowrank_dtype=lowrank_dtype, smoothed=smooth is not None, act_format=act_format, sparsity=sparsity,
                             input_hadamard=input_hadamard)
        tensors = pack_weight(q, fmt, layout, mask)
        if rank:
            tensors.update(pack_branch(branch.a, branch.b, lowrank_dtype))
        if smooth is not None:
            tensors["smooth_scale"] = smooth.float()
        if act_format is not None and act_format.static:
            tensors["input_scale"] = act_scale.float().reshape(1)
        return cls._assemble(fmt, out_features, in_features, bias, q.g_idx is not None, layout, tensors)

    @classmethod
    def from_pruned(cls, weight: Tensor, mask: Tensor, sparsity: str, bias: Tensor | None) -> CompressedLinear:
        """A 16-bit weight pruned N:M, stored as its kept values (in the weight's dtype) and a bitmask."""
        out_features, in_features = weight.shape
        layout = LayerLayout(sparsity=sparsity, values_dtype=str(weight.dtype).replace("torch.", ""))
        return cls._assemble(None, out_features, in_features, bias, False, layout, pack_sparse_values(weight, mask, layout))

    @classmethod
    def _assemble(cls, fmt: QuantFormat | None, out_features: int, in_features: int, bias: Tensor | None, has_g_idx: bool,
                  layout: LayerLayout, tensors: dict[str, Tensor]) -> CompressedLinear:
        layer = cls(in_features, out_features, fmt, bias=bias is not None,
                    dtype=bias.dtype if bias is not None else torch.float32, device="meta", has_g_idx=has_g_idx, layout=layout)
        for name, tensor in tensors.items():
            layer._buffers[name] = tensor.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def packed(self) -> dict[str, Tensor]:
        return {name: self._buffers[name] for name in self.packed_names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_packed(self.packed(), self.fmt, self.in_features, dtype, self.layout)

    def forward(self, x: Tensor) -> Tensor:
        if (self._dequantized is not None and self._dequantized.dtype == weight_dtype(self.layout, x.dtype)
                and self._dequantized.device == x.device):
            return compressed_linear_reference(x, self._dequantized, self.packed(), self.layout, self.bias)
        return quantized_linear(x, self.packed(), self.fmt, self.in_features, self.bias, self.layout, self._kernel_cache)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - signature of nn.Module._apply
        packed = {name: self._buffers.pop(name) for name in self.packed_names}
        self._kernel_cache = {}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in packed.items():
                # An integer probe reveals where fn moves tensors without letting it cast them.
                target = fn(torch.empty(0, dtype=torch.uint8, device=tensor.device)).device
                self._buffers[name] = tensor.to(target)
        return self

    def extra_repr(self) -> str:
        extras = "".join(f", {part}" for part in ("act-order" if self.has_g_idx else "", self.layout.describe()) if part)
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.describe() if self.fmt else '16-bit'}{extras}, bias={self.bias is not None}"


@contextmanager
def dequantized_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Keep every ``CompressedLinear``'s dequantized weight (in ``dtype``) for the duration of the
    block, so that many forward passes (perplexity, replaying a block) unpack each weight once.
    The reference path computes the very same tensor on every call, so results are identical;
    the memory of a float copy is held only inside the block."""
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    try:
        for layer in layers:
            layer._dequantized = layer.dequantized_weight(weight_dtype(layer.layout, dtype))
        yield
    finally:
        for layer in layers:
            layer._dequantized = None

"""Size accounting: parameters, bytes and bits per weight, before and after compression."""

from __future__ import annotations

from collections.abc import Collection
from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

from .nn import CompressedLinear
from .packing import BRANCH_TENSOR_PREFIXES, VALUE_TENSORS


@dataclass(frozen=True)
class SizeSummary:
    """Logical weights and stored bytes, for the whole model and for its compressed layers alone."""

    parameters: int
    bytes: int
    layer_parameters: int
    layer_bytes: int
    branch_bytes: int = 0  # of layer_bytes: the low-rank branches and smoothing vectors
    metadata_bytes: int = 0  # of layer_bytes: scales, zero points, g_idx and sparsity masks
    # How many layers each storage format holds ("INT4 g64 asym": 180): a group fitted to a
    # layer's inputs shows here beside the one asked for.
    layer_formats: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.parameters

    @property
    def layer_bits_per_weight(self) -> float:
        return 8 * self.layer_bytes / self.layer_parameters if self.layer_parameters else 0.0

    @property
    def branch_bits_per_weight(self) -> float:
        return 8 * self.branch_bytes / self.layer_parameters if self.layer_parameters else 0.0

    @property
    def metadata_bits_per_weight(self) -> float:
        return 8 * self.metadata_bytes / self.layer_parameters if self.layer_parameters else 0.0

    @property
    def base_bits_per_weight(self) -> float:
        """The weights' own codes (or kept values), without their metadata or the branch."""
        return self.layer_bits_per_weight - self.branch_bits_per_weight - self.metadata_bits_per_weight

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight, "layer_bits_per_weight": self.layer_bits_per_weight,
                "branch_bits_per_weight": self.branch_bits_per_weight, "metadata_bits_per_weight": self.metadata_bits_per_weight,
                "base_bits_per_weight": self.base_bits_per_weight}


def size_summary(model: nn.Module, layer_names: Collection[str] | None = None) -> SizeSummary:
    """Sizes as stored (tied tensors once). The "layer" figures cover the weights of the modules
    named in ``layer_names`` (default: every ``CompressedLinear``), biases excluded."""
    stored = set(model.state_dict())
    # Tied tensors are one object, which named_parameters lists once; nothing is copied, so a
    # model on the meta device (larger than memory) is measured as well.
    tensors = {name: tensor for name, tensor in (*model.named_parameters(), *model.named_buffers()) if name in stored}
    modules = dict(model.named_modules())
    if layer_names is None:
        layer_names = [name for name, module in modules.items() if isinstance(module, CompressedLinear)]
    layer_tensors: set[str] = set()
    layer_parameters = 0
    for name in layer_names:
        module = modules[name]
        layer_parameters += module.in_features * module.out_features
        owned = module.packed_names if isinstance(module, CompressedLinear) else ("weight",)
        layer_tensors.update(f"{name}.{tensor}" for tensor in owned)
    parameters = layer_parameters + sum(t.numel() for n, t in tensors.items() if n not in layer_tensors)
    nbytes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    layer_bytes = sum(nbytes[n] for n in layer_tensors)
    kinds = {n: n.rpartition(".")[2] for n in layer_tensors}
    branch_bytes = sum(nbytes[n] for n, kind in kinds.items() if kind.startswith(BRANCH_TENSOR_PREFIXES))
    value_bytes = sum(nbytes[n] for n, kind in kinds.items() if kind in VALUE_TENSORS)
    formats = Counter(_format_label(modules[name]) for name in layer_names)
    return SizeSummary(parameters=parameters, bytes=sum(nbytes.values()), layer_parameters=layer_parameters, layer_bytes=layer_bytes,
                       branch_bytes=branch_bytes, metadata_bytes=layer_bytes - branch_bytes - value_bytes,
                       layer_formats=dict(formats.most_common()))


def _format_label(module: nn.Module) -> str:
    if not isinstance(module, CompressedLinear):
        return "16-bit"
    return "16-bit sparse" if module.fmt is None else module.fmt.describe()



"""Round-to-nearest: each weight to its nearest code under min-max group scales. Data-free."""

from __future__ import annotations

from torch import Tensor

from ..config import QuantFormat
from ..formats import QuantizedWeight, quantize


def rtn(weight: Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Quantize a [N, K] weight with round-to-nearest in ``fmt``."""
    return quantize(weight.float(), fmt)

"""Which weights a run compresses, and why each other one is left as it is.

Every parameter of two or more dimensions is listed, so a weight the pipeline cannot see (a
layer type it does not handle) shows up instead of disappearing from a smaller-looking total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..errors import ConfigError
from ..passes import Target
from .structure import ROUTER, SKIPPED, TOO_SMALL, is_router

COMPRESSED = "compressed"
EMBEDDING = "embedding"
OUTPUT_HEAD = "output head"
NOT_LINEAR = "not a Linear layer: no pass handles this module type"
OUTSIDE_BLOCKS = "outside the decoder blocks"
# Reasons that the recipe or the defaults chose; ``--strict`` refuses the others.
CHOSEN = (SKIPPED, ROUTER, EMBEDDING, OUTPUT_HEAD, TOO_SMALL)


@dataclass
class WeightCoverage:
    name: str
    parameters: int
    status: str  # COMPRESSED, or why not

    @property
    def chosen(self) -> bool:
        return self.status == COMPRESSED or self.status.startswith(CHOSEN)


@dataclass
class Coverage:
    weights: list[WeightCoverage] = field(default_factory=list)

    @property
    def share(self) -> float:
        """The share of the weights' parameters that are compressed."""
        total = sum(w.parameters for w in self.weights)
        return sum(w.parameters for w in self.weights if w.status == COMPRESSED) / total if total else 0.0

    def left(self) -> dict[str, tuple[int, int]]:
        """Why weights are left uncompressed -> (how many, their parameters)."""
        reasons: dict[str, tuple[int, int]] = {}
        for weight in self.weights:
            if weight.status != COMPRESSED:
                count, parameters = reasons.get(weight.status.partition(":")[0], (0, 0))
                reasons[weight.status.partition(":")[0]] = (count + 1, parameters + weight.parameters)
        return reasons

    def check_strict(self) -> None:
        unexplained = [w for w in self.weights if not w.chosen]
        if unexplained:
            listed = ", ".join(f"{w.name} ({w.status})" for w in unexplained[:3])
            raise ConfigError(f"--strict: {len(unexplained)} weight(s) would be left uncompressed without an explicit skip: {listed}"
                              f"{' ...' if len(unexplained) > 3 else ''}; compress them, or add them to the recipe's ignore list")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_coverage(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, targets: list[Target], left: dict[str, str]) -> Coverage:
    """The coverage a run will have, known before any block is compressed: ``targets`` and
    ``left`` are the run's plan (``structure.plan_layers``)."""
    targeted = {t.name for t in targets}
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(),) if m is not None}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    coverage = Coverage()
    seen: set[int] = set()  # a weight shared by two modules (a tied head) counts once, under its first name
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(prefix=module_name, recurse=False):
            if parameter.dim() < 2 or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            status = _status(module_name, module, parameter, blocks_path, blocks, targeted, left, embeddings, head)
            coverage.weights.append(WeightCoverage(name, parameter.numel(), status))
    return coverage


def _status(module_name: str, module: nn.Module, parameter: nn.Parameter, blocks_path: str, blocks: nn.ModuleList, targeted: set[str],
            left: dict[str, str], embeddings: set[int], head: nn.Module | None) -> str:
    if module_name in targeted:
        return COMPRESSED
    if module_name in left:
        return left[module_name]
    if id(parameter) in embeddings or isinstance(module, nn.Embedding):
        return EMBEDDING
    if module is head:
        return OUTPUT_HEAD
    if module_name.startswith(f"{blocks_path}."):
        block_name, _, local_name = module_name[len(blocks_path) + 1:].partition(".")
        if is_router(blocks[int(block_name)], local_name, module):
            return ROUTER
        return f"{NOT_LINEAR} ({type(module).__name__})"
    return f"{OUTSIDE_BLOCKS} ({type(module).__name__})"

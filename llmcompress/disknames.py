"""Where a checkpoint stores each tensor the pipeline's model names.

The pipeline's model holds experts per expert (``llmcompress.experts``), under transformers' 
in-memory module names. A transformers-5 ``save_pretrained`` writes them per expert under the
names of the model's original checkpoints (Mixtral: ``block_sparse_moe.experts.3.w1``), and
some families keep them fused on disk (GPT-OSS, Llama 4: ``experts.gate_up_proj``). The
renames come from transformers' own conversion mapping for the model type, so a family it
learns to read is read here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .experts import FUSED_PARTS, ExpertList, FusedLayout, expert_tensors, fused_name_of

_EXPERT_TENSOR = re.compile(r"^(.*)\.(\d+)\.(\w+\.(?:weight|bias))$")
_LITERAL = re.compile(r"^[\w.\\]+$")  # a rename pattern without regex syntax beyond escaped dots


@dataclass(frozen=True)
class Source:
    """A tensor as stored: ``stored`` whole, or expert ``expert``'s ``part`` of a fused tensor."""

    stored: str
    expert: int | None = None
    part: str = ""
    layout: FusedLayout | None = None

    def take(self, tensor: Tensor) -> Tensor:
        if self.expert is None:
            return tensor
        return expert_tensors(self.layout, self.stored.rpartition(".")[2], tensor[self.expert])[self.part]


class CheckpointNames:
    """Finds, for the names of ``model``'s tensors, the tensors of a checkpoint holding them."""

    def __init__(self, model: nn.Module | None, stored: Mapping[str, object]) -> None:
        self.stored = stored
        self.layouts = {} if model is None else {name: m.layout for name, m in model.named_modules() if isinstance(m, ExpertList)}
        self.renames: list[tuple[str, str]] = []  # (in memory, on disk)
        self.templates: dict[str, list[str]] = {}  # fused name -> per-expert names on disk, '*' for the expert
        if model is not None:
            self._read_conversions(model)

    def _read_conversions(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        config = getattr(model, "config", None)
        conversions = get_checkpoint_conversion_mapping(type(model).__name__)
        if conversions is None and getattr(config, "model_type", None):
            conversions = get_checkpoint_conversion_mapping(config.model_type)
        for conversion in conversions or []:
            sources, targets = list(conversion.source_patterns), list(conversion.target_patterns)
            fused = targets[0].rpartition(".")[2] if len(targets) == 1 else None
            if fused in FUSED_PARTS and all("experts.*." in s for s in sources):
                self.templates[fused] = [s.partition("experts.")[2] for s in sources]
            elif len(sources) == len(targets) and all(_LITERAL.match(p) for p in (*sources, *targets)):
                self.renames += [(t.replace("\\", ""), s.replace("\\", "")) for s, t in zip(sources, targets, strict=True)]

    def _renamed(self, name: str) -> list[str]:
        candidates = [name]
        for in_memory, on_disk in self.renames:
            candidates += [c.replace(in_memory, on_disk) for c in list(candidates) if in_memory in c]
        return candidates

    def sources(self, names: Iterable[str]) -> tuple[dict[str, Source], list[str]]:
        """Each name's source, and the names the checkpoint does not hold."""
        found, missing = {}, []
        for name in names:
            source = self._source(name)
            if source is None:
                missing.append(name)
            else:
                found[name] = source
        return found, missing

    def _source(self, name: str) -> Source | None:
        direct = next((c for c in self._renamed(name) if c in self.stored), None)
        if direct is not None:
            return Source(direct)
        match = _EXPERT_TENSOR.match(name)
        if match is None or match[1] not in self.layouts:
            return None
        base, expert, part = match[1], int(match[2]), match[3]
        layout = self.layouts[base]
        projection, _, kind = part.partition(".")
        for stored_base in self._renamed(base):
            for fused, templates in self.templates.items():
                if projection in FUSED_PARTS[fused] and kind == "weight":
                    template = templates[FUSED_PARTS[fused].index(projection)]
                    candidate = f"{stored_base}.{template.replace('*', str(expert))}"
                    if candidate in self.stored:
                        return Source(candidate)
            candidate = f"{stored_base}.{fused_name_of(layout, part)}"
            if candidate in self.stored:
                return Source(candidate, expert=expert, part=part, layout=layout)
        return None


def stored_module_name(names: CheckpointNames, module: str) -> str | None:
    """The name a checkpoint of the model's family gives ``module`` (a per-expert Linear keeps its
    expert under the family's per-expert name); None for an expert of a family that stores its
    experts fused, which holds no per-expert layer at all."""
    for in_memory, on_disk in names.renames:
        module = module.replace(in_memory, on_disk)
    match = re.match(r"^(.*)\.(\d+)\.(\w+)$", module)
    if match is None or not any(match[1] in names._renamed(base) for base in names.layouts):
        return module
    for fused, templates in names.templates.items():
        if match[3] in FUSED_PARTS[fused]:
            template = templates[FUSED_PARTS[fused].index(match[3])].removesuffix(".weight")
            return f"{match[1]}.{template.replace('*', match[2])}"
    return None

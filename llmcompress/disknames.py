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
from .surgery import stored_transposed

_EXPERT_TENSOR = re.compile(r"^(.*)\.(\d+)\.(\w+\.(?:weight|bias))$")
_LITERAL = re.compile(r"^\^?[\w.\\]+$")  # a rename pattern without regex syntax beyond escaped dots and a leading ^


@dataclass(frozen=True)
class Source:
    """A tensor as stored: ``stored`` whole, or expert ``expert``'s ``part`` of a fused tensor."""

    stored: str
    expert: int | None = None
    part: str = ""
    layout: FusedLayout | None = None
    transposed: bool = False  # stored [in, out] (GPT-2's Conv1D)

    def take(self, tensor: Tensor) -> Tensor:
        if self.transposed:
            return tensor.T.contiguous()
        if self.expert is None:
            return tensor
        return expert_tensors(self.layout, self.stored.rpartition(".")[2], tensor[self.expert])[self.part]


class CheckpointNames:
    """Finds, for the names of ``model``'s tensors, the tensors of a checkpoint holding them."""

    def __init__(self, model: nn.Module, stored: Mapping[str, object]) -> None:
        self.stored = stored
        self.layouts = {name: m.layout for name, m in model.named_modules() if isinstance(m, ExpertList)}
        self.transposed = stored_transposed(model)
        self.renames: list[tuple[str, str]] = []  # (in memory, on disk); a leading ^ anchors at the name's start
        self.templates: dict[str, list[str]] = {}  # fused name -> per-expert names on disk, '*' for the expert
        self._read_conversions(model)

    def _read_conversions(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        config = getattr(model, "config", None)
        conversions = get_checkpoint_conversion_mapping(type(model).__name__)
        if conversions is None and getattr(config, "model_type", None):
            conversions = get_checkpoint_conversion_mapping(config.model_type)
        for conversion in conversions or []:
            sources, targets = _patterns(conversion.source_patterns), _patterns(conversion.target_patterns)
            fused = targets[0].rpartition(".")[2] if len(targets) == 1 else None
            if fused in FUSED_PARTS and all("experts.*." in s for s in sources):
                self.templates[fused] = [s.partition("experts.")[2] for s in sources]
            elif len(sources) == len(targets) and all(_LITERAL.match(p) for p in (*sources, *targets)):
                anchor = "^" if sources[0].startswith("^") else ""
                self.renames += [(anchor + t.lstrip("^").replace("\\", ""), s.lstrip("^").replace("\\", ""))
                                 for s, t in zip(sources, targets, strict=True)]

    def _renamed(self, name: str) -> list[str]:
        candidates = [name]
        for in_memory, on_disk in self.renames:
            candidates += [renamed for c in list(candidates) if (renamed := _rename(c, in_memory, on_disk)) != c]
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
            return Source(direct, transposed=name in self.transposed)
        match = _EXPERT_TENSOR.match(name)
        if match is None or match[1] not in self.layouts:
            return None
        base, expert, part = match[1], int(match[2]), match[3]
        layout = self.layouts[base]
        projection, _, kind = part.partition(".")
        for stored_base in self._renamed(base):
            module = self._expert_module(stored_base, expert, projection)
            if module is not None and kind == "weight" and f"{module}.weight" in self.stored:
                return Source(f"{module}.weight")
            candidate = f"{stored_base}.{fused_name_of(layout, part)}"
            if candidate in self.stored:
                return Source(candidate, expert=expert, part=part, layout=layout)
        return None

    def _expert_module(self, base: str, expert: int | str, projection: str) -> str | None:
        """An expert projection's module under the family's per-expert checkpoint names
        (Mixtral: ``...experts.3.w1``); None where the family stores its experts fused."""
        for fused, templates in self.templates.items():
            if projection in FUSED_PARTS[fused]:
                template = templates[FUSED_PARTS[fused].index(projection)].removesuffix(".weight")
                return f"{base}.{template.replace('*', str(expert))}"
        return None

    def stored_module(self, module: str) -> str | None:
        """The name a checkpoint of the model's family gives ``module``; None for an expert of a
        family that stores its experts fused, which holds no per-expert layer at all."""
        module += "."  # rename patterns name whole modules, with their dot (``^embed_out\.``)
        for in_memory, on_disk in self.renames:
            module = _rename(module, in_memory, on_disk)
        module = module[:-1]
        match = re.match(r"^(.*)\.(\d+)\.(\w+)$", module)
        if match is None or not any(match[1] in self._renamed(base) for base in self.layouts):
            return module
        return self._expert_module(match[1], match[2], match[3])


def _patterns(patterns: str | Iterable[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _rename(name: str, in_memory: str, on_disk: str) -> str:
    if in_memory.startswith("^"):
        return on_disk + name[len(in_memory) - 1:] if name.startswith(in_memory[1:]) else name
    return name.replace(in_memory, on_disk)


class StoredNames:
    """Module and tensor names of a model as its family's checkpoints spell them, both ways.
    Experts of a family that stores them fused keep the model's names (no per-expert name exists)."""

    def __init__(self, model: nn.Module) -> None:
        names = CheckpointNames(model, {})
        self.fused = []  # modules with no per-expert name in the family's checkpoints
        self.to_disk: dict[str, str] = {}
        for name, _ in model.named_modules():
            stored = names.stored_module(name)
            if stored is None:
                self.fused.append(name)
            elif stored != name:
                self.to_disk[name] = stored
        self.to_memory = {stored: name for name, stored in self.to_disk.items()}

    def module(self, name: str, to_disk: bool = True) -> str:
        return (self.to_disk if to_disk else self.to_memory).get(name, name)

    def tensor(self, name: str, to_disk: bool = True) -> str:
        module, _, local = name.rpartition(".")
        return f"{self.module(module, to_disk)}.{local}" if module else name

    def tensors(self, tensors: Mapping[str, Tensor], to_disk: bool = True) -> dict[str, Tensor]:
        return {self.tensor(name, to_disk): tensor for name, tensor in tensors.items()}

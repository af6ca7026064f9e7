"""Write a compressed model in a format that the serving ecosystem loads with no code of ours.

``native`` is our own checkpoint (it keeps everything). ``compressed-tensors`` is what
transformers (with the ``compressed-tensors`` package) and vLLM load; ``gptq`` is the GPTQ v1
layout of AutoGPTQ / GPTQModel that transformers and vLLM also load. A low-rank branch goes
beside either as a PEFT LoRA adapter in ``adapter/``. Whatever a format cannot hold is refused with
the layer and the reason, before anything is written, and every export is written atomically,
with the checksums of its files in a file of their own that the serving engines ignore.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import checkpoint
from ..hfconfig import AUTO_MAP
from ..config import PER_CHANNEL
from ..disknames import StoredNames
from ..experts import expert_index
from ..surgery import stored_transposed
from ..errors import CheckpointError
from ..fileio import staged_directory
from ..lock import output_lock
from ..nn import CompressedLinear
from ..packing import unpack_branch
from ..layouts import compressed_tensors, gptq
from ..outdir import ADAPTER_DIR
from . import engines, peft
from .engines import DEFAULT_ENGINE, ENGINES

FORMATS = ("native", "compressed-tensors", "gptq")


class ExportError(CheckpointError):
    """The model holds something the chosen export format cannot express."""


def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "native", tokenizer: Any = None,
           adapter: bool = True, overwrite: bool = False, report: dict | None = None, engine: str = DEFAULT_ENGINE) -> Path:
    """Write ``model`` (from ``llmcompress.compress`` or ``llmcompress.load``) as ``format``.

    With ``adapter`` the low-rank branches of a compressed-tensors or GPTQ export go to
    ``adapter/`` as a PEFT LoRA adapter; without it a layer with a branch is refused. A serving
    format is written for ``engine`` (``vllm`` or ``transformers``), and refuses what that
    engine would refuse to load (``llmcompress.export.engines``). Returns the directory.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if engine not in ENGINES:
        raise ExportError(f"unknown serving engine {engine!r}: choose one of {', '.join(ENGINES)}")
    with output_lock(out_dir):
        out = checkpoint.check_output_dir(out_dir, overwrite)
        if format == "native":
            config = getattr(model, "llmcompress_config", None)
            if config is None:
                raise ExportError("this model was not compressed by llmcompress (no llmcompress config): there is nothing native to write")
            return checkpoint.save(model, out, config, tokenizer=tokenizer, report=report, overwrite=overwrite)
        return _export_serving(model, out, format, tokenizer, adapter, report, engine)


def _export_serving(model: nn.Module, out: Path, format: str, tokenizer: Any, adapter: bool, report: dict | None, engine: str) -> Path:
    """compressed-tensors or GPTQ: the packed layers converted, the rest of the state dict as it is."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    problems: dict[str, list[str]] = {}  # reason -> the layers it stops
    for name, layer in layers.items():
        if reason := _expert_refusal(model, name, layer, adapter) or _refusal(format, layer, adapter, engine):
            problems.setdefault(reason, []).append(name)
    if problems:
        count = sum(map(len, problems.values()))
        raise ExportError(f"{format} for {engine} cannot hold {count} layer(s): " + "; ".join(
            f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {reason}" for reason, names in problems.items()))
    if not layers:
        raise ExportError(f"the model has no quantized layers: there is nothing for {format} to describe")
    names = _stored_names(model, format)
    # Everything else holding a matrix (routers, a head, layers left in 16 bits) is named, so that
    # a loader matching class names (vLLM's "Linear") does not quantize it.
    embeddings = {id(model.get_input_embeddings())}
    ignore = [names.module(name) for name, m in model.named_modules()
              if name not in layers and id(m) not in embeddings and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2]
    hf_config = model.config.to_dict()
    if hf_config.get("auto_map") == AUTO_MAP:  # a native checkpoint's loader; transformers and vLLM read exports themselves
        del hf_config["auto_map"]
    # What save_pretrained records: vLLM picks the model class (and generation) from it.
    hf_config["architectures"] = hf_config.get("architectures") or [type(model).__name__]
    hf_config["dtype"] = str(layer_dtype(model)).replace("torch.", "")
    # GPTQ configs say "lm_head": false for the head; naming it again would only lengthen the pattern.
    head = {names.module(name) for name, m in model.named_modules() if m is model.get_output_embeddings()}
    hf_config["quantization_config"] = _quantization_config(format, {names.module(name): layer for name, layer in layers.items()}, ignore, head)
    tensors, _ = checkpoint.unique_state_dict(model)
    adapter_tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        packed = layer.packed()
        for local in layer.packed_names:
            tensors.pop(f"{name}.{local}")
        tensors.update({f"{name}.{local}": tensor.contiguous() for local, tensor in _layer_tensors(format, layer, packed).items()})
        if layer.layout.rank:
            a, b = unpack_branch(packed, torch.float16)
            ranks[names.module(name)] = peft.served_rank(layer.layout.rank)
            adapter_tensors.update(peft.adapter_tensors(names.module(name), a, b, ranks[names.module(name)]))
    tensors = names.tensors(tensors)
    with staged_directory(out) as staging:
        checkpoint.write_shards(tensors, staging, checkpoint.DEFAULT_SHARD_BYTES)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if report is not None:
            (staging / checkpoint.REPORT_FILE).write_text(json.dumps(report, indent=2))
        if adapter_tensors:
            adapter_dir = staging / ADAPTER_DIR
            adapter_dir.mkdir()
            save_file(adapter_tensors, adapter_dir / peft.ADAPTER_WEIGHTS, metadata={"format": "pt"})
            config = peft.adapter_config(ranks, base_model=out.name)
            (adapter_dir / peft.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        checkpoint.write_config(hf_config, staging)
    return out


def _stored_names(model: nn.Module, format: str) -> StoredNames:
    """The model's names in the family's own checkpoints (per-expert names such as Mixtral's
    ``block_sparse_moe.experts.3.w1``), which transformers and vLLM look the tensors up by."""
    transposed = sorted(stored_transposed(model))
    if transposed:
        raise ExportError(f"{type(model).__name__} stores its layers as Conv1D ({transposed[0].removesuffix('.weight')}), which the "
                          f"{format} loaders of transformers and vLLM do not quantize (they match nn.Linear): export native")
    names = StoredNames(model)
    if names.fused:
        raise ExportError(f"{type(model).__name__} keeps its experts fused in its checkpoints ({names.fused[0].rpartition('.')[0]}), and "
                          f"{format} would write them per expert, which transformers and vLLM do not read for this family: export native")
    return names


def _expert_refusal(model: nn.Module, name: str, layer: CompressedLinear, adapter: bool) -> str | None:
    if layer.layout.rank and adapter and expert_index(name, model) is not None:
        return ("a low-rank branch on an expert has no place in a PEFT LoRA adapter (LoRA adapters hold no per-expert "
                "branches that vLLM applies): export native, or give the experts no branch (lowrank targets without 'experts')")
    return None


def _refusal(format: str, layer: CompressedLinear, adapter: bool, engine: str) -> str | None:
    """Why ``format`` cannot hold this layer, or ``engine`` would not load it: its number format
    first, then what its layout adds."""
    if format == "gptq":
        reason = gptq.format_refusal(layer.fmt, layer.packed())
    else:
        reason = compressed_tensors.format_refusal(layer.fmt, layer.has_g_idx)
    return reason or engines.refusal(engine, format, layer.fmt) or _layout_refusal(format, layer, adapter)


def _layout_refusal(format: str, layer: CompressedLinear, adapter: bool) -> str | None:
    """What neither serving format holds beside a plain grouped weight."""
    layout, fmt = layer.layout, layer.fmt
    if layout.sparsity is not None:
        return f"its {layout.sparsity} sparse storage has no place in {format}: compress without --pattern N:M, or export native"
    if layout.smoothed:
        return f"its SVDQuant smoothing stayed in the layer (no norm or linear could absorb it), which {format} cannot express: export native"
    if layout.act_format is not None and (format != "compressed-tensors" or layout.rank):
        return f"its activations are quantized ({layout.act_format.describe()}), which {format} does not hold here: export native"
    if layout.act_format is not None and (reason := compressed_tensors.activation_refusal(fmt, layout.act_format)):
        return reason
    if layout.input_hadamard:
        return (f"its input is rotated online (rotate's Hadamard before {layer.in_features} inputs), which {format} does not "
                "hold here: export native, or rotate with online: null (the offline rotation exports as plain weights)")
    if layout.rank and not adapter:
        return "it has a low-rank branch: export the branch as a PEFT adapter (--adapter) or export native"
    if layout.rank > peft.VLLM_RANKS[-1]:
        return f"its rank-{layout.rank} branch is above the largest LoRA rank vLLM serves ({peft.VLLM_RANKS[-1]}): export native"
    if fmt.group_size != PER_CHANNEL and layer.in_features % fmt.group_size:
        return (f"its {layer.in_features} inputs are not a whole number of groups of {fmt.group_size}, and {format} refuses "
                f"partial groups: compress with a group size dividing {layer.in_features} (e.g. 64 or 32), or export native")
    return None


def _layer_tensors(format: str, layer: CompressedLinear, packed: dict[str, Tensor]) -> dict[str, Tensor]:
    if format == "gptq":
        return gptq.layer_tensors(layer.fmt, packed, layer.in_features)
    return compressed_tensors.layer_tensors(layer.fmt, packed, layer.out_features, layer.in_features, layer.layout.act_format)


def _quantization_config(format: str, layers: dict[str, CompressedLinear], ignore: list[str], head: set[str]) -> dict:
    if format == "gptq":
        return gptq.quantization_config({n: m.fmt for n, m in layers.items()}, {n: m.has_g_idx for n, m in layers.items()},
                                        [name for name in ignore if name not in head])
    return compressed_tensors.quantization_config({n: m.fmt for n, m in layers.items()}, ignore,
                                                  {n: m.layout.act_format for n, m in layers.items()})


def notes(model: nn.Module, format: str, engine: str = DEFAULT_ENGINE) -> list[str]:
    """What a user should know about an export that succeeded: padded adapter ranks, formats
    only vLLM's GPU builds run, and the GPTQ v1 convention for asymmetric layers."""
    if format == "native":
        return []
    lines = [f"adapter: {name} rank {rank} padded with zeros to {served}, a rank vLLM serves"
             for name, (rank, served) in padded_branches(model).items()]
    formats = {m.fmt for m in model.modules() if isinstance(m, CompressedLinear) and m.fmt is not None}
    # W8A8 runs on vLLM's CPU INT8 GEMM, so only weight-only layers' formats decide what needs a GPU.
    weight_only = {m.fmt for m in model.modules() if isinstance(m, CompressedLinear) and m.fmt is not None and m.layout.act_format is None}
    if engine == "vllm":
        lines += sorted({note for fmt in weight_only if (note := engines.cpu_note(fmt))})
    if format == "gptq" and any(not fmt.symmetric for fmt in formats):
        lines.append("gptq: asymmetric layers are stored as GPTQ v1 does, zero point minus one (no zero point was 0); "
                     "vLLM refuses them: they load in transformers through GPTQModel")
    return lines


def padded_branches(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{layer: (rank, served rank)} for the branches an adapter export pads (vLLM's rank list)."""
    return {name: (m.layout.rank, peft.served_rank(m.layout.rank)) for name, m in model.named_modules()
            if isinstance(m, CompressedLinear) and m.layout.rank and peft.served_rank(m.layout.rank) != m.layout.rank}


def layer_dtype(model: nn.Module):  # noqa: ANN201 - a torch.dtype
    return model.get_input_embeddings().weight.dtype

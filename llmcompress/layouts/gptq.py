"""The GPTQ v1 layout (``quant_method: "gptq"``, ``checkpoint_format: "gptq"``) that
transformers (through optimum / GPTQModel) and vLLM (its GPTQ and Marlin kernels) load.

Per layer, with b in {2, 4, 8}, G = K / group_size groups (one per channel: G = 1):

- ``qweight`` int32 [K*b/32, N]: column n's codes packed along the input dimension, code k in
  bits (k mod 32/b)*b of word k*b/32: exactly our ``weight_packed`` [N, K*b/32] transposed.
- ``qzeros`` int32 [G, N*b/32]: the zero points minus one, packed the same way along N (v1
  readers add the one back). A zero point of 0 cannot be stored: it would wrap to 2^b - 1.
- ``scales`` float16 [G, N]: our ``weight_scale`` transposed.
- ``g_idx`` int32 [K]: the group of each input column (k // group_size, or act-order's).

Pure functions on packed tensors, and the ``quantization_config`` block.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import PER_CHANNEL, QuantFormat
from ..formats import group_index, implicit_zero
from ..packing import pack_int, unpack_int

QUANT_METHOD = "gptq"
PACKED_TENSOR = "qweight"  # the tensor that marks a quantized layer
BITS = (2, 4, 8)
# vLLM's Llama-style models load these sibling layers as one (packed_modules_mapping).
_EXPERT = re.compile(r"(.*\.experts)\.\d+\.")
VLLM_FUSED_LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def format_refusal(fmt: QuantFormat | None, packed: dict[str, Tensor]) -> str | None:
    """Why GPTQ v1 cannot hold this layer's number format or zero points, or None."""
    if fmt is None or fmt.is_fp4:
        return "GPTQ stores integer codes only (FP4 and 16-bit sparse weights need compressed-tensors or native)"
    if fmt.bits not in BITS:
        return f"GPTQ v1 packs {', '.join(map(str, BITS))}-bit codes; {fmt.bits}-bit needs compressed-tensors or native"
    zeros = unpack_zeros(fmt, packed, packed["weight_scale"].shape[1])
    if bool((zeros == 0).any()):
        count = int((zeros == 0).sum())
        return (f"{count} of its zero points are 0, which GPTQ v1 (it stores zero - 1) cannot hold: compress with --sym, "
                "or export compressed-tensors")
    return None


def layer_tensors(fmt: QuantFormat, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
    """One layer's GPTQ v1 tensors (names local to the module) from our packed ones."""
    scales = packed["weight_scale"]
    out_features, groups = scales.shape
    zeros = unpack_zeros(fmt, packed, groups)
    g_idx = packed.get("weight_g_idx")
    if g_idx is None:
        g_idx = group_index(None, fmt, in_features, scales.device)
    return {
        "qweight": packed["weight_packed"].T.contiguous(),
        "qzeros": pack_int((zeros.to(torch.int16) - 1).to(torch.uint8).T.contiguous(), fmt.bits),
        "scales": scales.T.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_zeros(fmt: QuantFormat, packed: dict[str, Tensor], groups: int) -> Tensor:
    """Zero points uint8 [N, G]: stored ones, or the implicit midpoint of a symmetric format."""
    if "weight_zero_point" in packed:
        return unpack_int(packed["weight_zero_point"], fmt.bits, groups)
    out_features = packed["weight_scale"].shape[0]
    return torch.full((out_features, groups), implicit_zero(fmt), dtype=torch.uint8, device=packed["weight_scale"].device)


def native_layer(fmt: QuantFormat, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], int, bool]:
    """The inverse of ``layer_tensors``: our packed tensors, in_features, and whether the layer keeps a g_idx."""
    in_features = tensors["g_idx"].numel()
    scales = tensors["scales"].T.contiguous()
    out_features, groups = scales.shape
    packed = {"weight_packed": tensors["qweight"].T.contiguous(), "weight_scale": scales}
    if not fmt.symmetric:
        stored = unpack_int(tensors["qzeros"], fmt.bits, out_features).T  # [N, G], zero - 1
        packed["weight_zero_point"] = pack_int(((stored.to(torch.int16) + 1) % 2**fmt.bits).to(torch.uint8).contiguous(), fmt.bits)
    g_idx = tensors["g_idx"].to(torch.int32)
    contiguous = group_index(None, fmt, in_features, g_idx.device).to(torch.int32)
    if not torch.equal(g_idx, contiguous):
        packed["weight_g_idx"] = g_idx
        return packed, in_features, True
    return packed, in_features, False


def quantization_config(module_formats: dict[str, QuantFormat], act_order: dict[str, bool], ignore: Sequence[str] = ()) -> dict:
    """The keys transformers (GPTQConfig) and vLLM read: the most common format (ties to the
    first module's) as the model's, each other format as a ``dynamic`` override of the modules
    holding it, which GPTQModel and vLLM both apply (``"+:regex"``, ``re.match``), and the
    ``ignore``d layers (kept in 16 bits) as a ``"-:regex"`` override, without which vLLM builds
    every Linear as a GPTQ layer and cannot load their weights."""
    counts = Counter(module_formats.values())
    base = max(counts, key=lambda fmt: counts[fmt])
    base_order = any(act_order[name] for name, fmt in module_formats.items() if fmt == base)
    dynamic = {}
    for fmt in sorted(set(counts) - {base}, key=lambda f: (f.bits, f.group_size, f.symmetric)):
        modules = sorted(name for name, f in module_formats.items() if f == fmt)
        names = modules + _vllm_fused_names(modules, module_formats)
        dynamic[_override("+", names)] = _keys(fmt, any(act_order[n] for n in modules))
    skipped = [*ignore, *_vllm_fused_names(list(ignore), dict.fromkeys(ignore, None)), *_whole_expert_modules(ignore, module_formats)]
    if skipped:
        dynamic[_override("-", skipped)] = {}
    return {"quant_method": QUANT_METHOD, "checkpoint_format": "gptq", **_keys(base, base_order), "static_groups": False,
            "true_sequential": True, "lm_head": False, "pack_dtype": "int32", **({"dynamic": dynamic} if dynamic else {})}


def _override(sign: str, names: Sequence[str]) -> str:
    """A ``dynamic`` key: ``+`` (these modules take the keys) or ``-`` (left unquantized), then a
    pattern that ``re.match`` fits to exactly these names."""
    return f"{sign}:(" + "|".join(re.escape(name) for name in names) + ")$"


def _keys(fmt: QuantFormat, act_order: bool) -> dict:
    return {"bits": fmt.bits, "group_size": -1 if fmt.group_size == PER_CHANNEL else fmt.group_size, "sym": fmt.symmetric,
            "desc_act": act_order}


def _whole_expert_modules(ignore: Sequence[str], module_formats: dict[str, QuantFormat]) -> list[str]:
    """The experts modules (``model.layers.3.mlp.experts``) none of whose experts is packed: vLLM
    builds one fused layer for them and matches overrides against its name."""
    experts = {match.group(1) for name in ignore if (match := _EXPERT.match(name))}
    packed = {match.group(1) for name in module_formats if (match := _EXPERT.match(name))}
    return sorted(experts - packed)


def _vllm_fused_names(modules: list[str], module_formats: dict[str, QuantFormat | None]) -> list[str]:
    """vLLM matches overrides against its fused layers (``self_attn.qkv_proj``), so a fused layer
    whose parts all hold one format is named too."""
    fused = []
    for merged, parts in VLLM_FUSED_LAYERS.items():
        for name in modules:
            parent, _, local = name.rpartition(".")
            siblings = [f"{parent}.{part}" for part in parts]
            if local == parts[0] and all(s in module_formats and module_formats[s] == module_formats[name] for s in siblings):
                fused.append(f"{parent}.{merged}")
    return fused


def module_formats(config: dict, packed_modules: list[str]) -> dict[str, QuantFormat]:
    """Each packed module's format: the model's, or the first ``dynamic`` override matching it."""
    base = format_from_config(config)
    result = {}
    for name in packed_modules:
        override = next((keys for pattern, keys in config.get("dynamic", {}).items()
                         if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), name)), {})
        result[name] = format_from_config({**config, **override}) if override else base
    return result


def format_from_config(config: dict) -> QuantFormat:
    """Our format for a GPTQ v1 ``quantization_config`` (2/4/8 bits: the packings written here)."""
    if config.get("checkpoint_format", "gptq") != "gptq" or int(config["bits"]) not in BITS:
        raise ValueError(f"GPTQ {config.get('checkpoint_format', 'gptq')} with {config['bits']}-bit codes is not a layout llmcompress reads "
                         f"(v1 with {', '.join(map(str, BITS))} bits)")
    return QuantFormat(kind="int", bits=int(config["bits"]), group_size=int(config.get("group_size", 128)), symmetric=bool(config.get("sym", True)))

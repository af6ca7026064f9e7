"""The compressed-tensors layout (``quant_method: "compressed-tensors"``), which transformers and
vLLM load with no code of ours: per-layer tensors and the ``quantization_config`` block.

Pure functions on packed tensors. Our native packing was chosen to match this spec, so most
tensors carry over as they are:

- INT (``pack-quantized``): ``weight_packed`` int32 [N, ceil(K*b/32)] is the same LSB-first
  bitstream of ``q + 2^(b-1)`` (compressed-tensors quantizes to signed ``q`` in
  [-2^(b-1), 2^(b-1) - 1]; our codes are that offset already). ``weight_scale`` [N, G] is ours.
  Asymmetric zero points become signed ``z - 2^(b-1)`` and are packed along the output
  dimension, int32 [ceil(N*b/32), G] (``pack_to_int32(zero_point, packed_dim=0)``), where ours
  are packed along the groups. ``weight_shape`` int64 [2] records (N, K).
- NVFP4 (``nvfp4-pack-quantized``): ``weight_packed`` uint8 [N, K/2] (even element in the low
  nibble, sign in bit 3), ``weight_scale`` float8_e4m3fn [N, K/16] and ``weight_global_scale``
  float32 [1], with value = e2m1 * scale / global_scale: exactly ours.

- W8A8 INT8 (``int-quantized``, quantized activations on INT8 per-channel weights): ``weight``
  int8 [N, K], the signed codes; ``weight_scale`` float32 [N, 1]; a static activation scale is
  ``input_scale`` float32 [1]. The activations' scheme (``input_activations``) is INT8 per token,
  dynamic, or per tensor, static: what vLLM's W8A8 INT8 kernels run, on CPUs too.

compressed-tensors groups must tile the layer (it raises on a width that is not a multiple of
the group size), has no act-order ``g_idx`` for static formats since its 2026 releases, and has
no place for our low-rank branch, in-layer smoothing, other activation formats or N:M storage:
``format_refusal`` and ``llmcompress.export``'s layout checks name which of these stops a layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..actformat import ActFormat
from ..config import PER_CHANNEL, QuantFormat
from ..packing import pack_int, unpack_int

QUANT_METHOD = "compressed-tensors"
PACKED_TENSOR = "weight_packed"  # the tensor that marks a quantized layer
INT_FORMAT = "pack-quantized"
NVFP4_FORMAT = "nvfp4-pack-quantized"
W8A8_FORMAT = "int-quantized"
MIXED_FORMAT = "mixed-precision"


def format_refusal(fmt: QuantFormat | None, has_g_idx: bool) -> str | None:
    """Why compressed-tensors cannot hold this layer's number format or grouping, or None."""
    if fmt is None:
        return "it is a 16-bit N:M sparse weight, and pack-quantized has no sparsity (export it native)"
    if fmt.kind == "mxfp4":
        return "MXFP4 export is not implemented here (INT and NVFP4 are); export it native"
    if has_g_idx:
        return "its act-order g_idx needs dynamic groups, which compressed-tensors dropped: compress with static groups (the default)"
    return None


def activation_refusal(fmt: QuantFormat, act: ActFormat) -> str | None:
    """Why compressed-tensors (as vLLM serves it) cannot hold this layer's quantized activations, or None."""
    if act.kind != "int" or act.bits != 8:
        return (f"its {act.describe()} activations have no compressed-tensors scheme here (W8A8 INT8 is written; FP8 activations "
                "need FP8 weights, not written yet): export native")
    if act.pow2_scales or act.group_size != -1:
        return f"its {act.describe()} activations are not a scale layout engines compute (per token, or one static scale): export native"
    if fmt.kind != "int" or fmt.bits != 8 or fmt.group_size != PER_CHANNEL or not fmt.symmetric:
        return (f"INT8 activations on {fmt.describe()} weights: vLLM's W8A8 INT8 takes symmetric INT8 per-channel weights "
                "(compress with --bits 8 --group-size -1 --sym), or export native")
    return None


def layer_tensors(fmt: QuantFormat, packed: dict[str, Tensor], out_features: int, in_features: int,
                  act: ActFormat | None = None) -> dict[str, Tensor]:
    """One layer's compressed-tensors tensors (names local to the module) from our packed ones."""
    if act is not None:
        codes = unpack_int(packed["weight_packed"], fmt.bits, in_features)
        tensors = {"weight": (codes.to(torch.int16) - 2 ** (fmt.bits - 1)).to(torch.int8),
                   "weight_scale": packed["weight_scale"].float().reshape(out_features, 1)}
        if act.static:
            tensors["input_scale"] = packed["input_scale"].float().reshape(1)
        return tensors
    if fmt.kind == "nvfp4":
        return {name: packed[name] for name in ("weight_packed", "weight_scale", "weight_global_scale")}
    tensors = {"weight_packed": packed["weight_packed"], "weight_scale": packed["weight_scale"],
               "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not fmt.symmetric:
        groups = packed["weight_scale"].shape[1]
        zeros = unpack_int(packed["weight_zero_point"], fmt.bits, groups)  # [N, G], already z + 2^(b-1)
        tensors["weight_zero_point"] = pack_int(zeros.T.contiguous(), fmt.bits).T.contiguous()
    return tensors


def native_layer(fmt: QuantFormat, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], int, bool]:
    """The inverse of ``layer_tensors``: our packed tensors, in_features, and whether a g_idx is kept (never)."""
    packed = {name: tensors[name] for name in ("weight_packed", "weight_scale")}
    if fmt.kind == "nvfp4":
        packed["weight_global_scale"] = tensors["weight_global_scale"]
        return packed, packed["weight_packed"].shape[1] * 2, False
    if not fmt.symmetric:
        out_features = int(tensors["weight_shape"][0])
        zeros = unpack_int(tensors["weight_zero_point"].T.contiguous(), fmt.bits, out_features)  # [G, N]
        packed["weight_zero_point"] = pack_int(zeros.T.contiguous(), fmt.bits)
    return packed, int(tensors["weight_shape"][1]), False


def weights_scheme(fmt: QuantFormat) -> dict:
    """The ``weights`` QuantizationArgs of one format, as compressed-tensors serialises them."""
    common = {"block_structure": None, "dynamic": False, "actorder": None, "observer": None, "observer_kwargs": {}}
    if fmt.kind == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None, **common}
    per_channel = fmt.group_size == PER_CHANNEL
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "group_size": None if per_channel else fmt.group_size,
            "strategy": "channel" if per_channel else "group", "scale_dtype": None,
            "zp_dtype": None if fmt.symmetric else "torch.int8", **common}


def activation_scheme(act: ActFormat) -> dict:
    """The ``input_activations`` QuantizationArgs of an INT8 activation format."""
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "tensor" if act.static else "token",
            "block_structure": None, "dynamic": not act.static, "actorder": None, "observer": "minmax" if act.static else None,
            "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def scheme_format(fmt: QuantFormat, act: ActFormat | None = None) -> str:
    if act is not None:
        return W8A8_FORMAT
    return NVFP4_FORMAT if fmt.kind == "nvfp4" else INT_FORMAT


def format_from_scheme(weights: dict) -> QuantFormat:
    """Our format for a compressed-tensors ``weights`` block (only what ``weights_scheme`` writes)."""
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if kind == "float" and bits == 4 and weights.get("group_size") == 16:
        return QuantFormat(kind="nvfp4")
    # "static" and "weight" act-order (llm-compressor's GPTQ) reorder only during calibration: no g_idx is stored.
    if kind == "int" and strategy in ("group", "channel") and weights.get("actorder") in (None, "static", "weight") and not weights.get("dynamic"):
        group = PER_CHANNEL if strategy == "channel" else weights["group_size"]
        return QuantFormat(kind="int", bits=bits, group_size=group, symmetric=bool(weights.get("symmetric", True)))
    raise ValueError(f"compressed-tensors weights {weights} are not a format llmcompress reads (INT group/channel, NVFP4)")


def quantization_config(module_formats: dict[str, QuantFormat], ignore: list[str],
                        activations: dict[str, ActFormat | None] | None = None) -> dict:
    """The ``quantization_config`` of config.json: one config group per distinct format (of the
    weights, and of the activations where ``activations`` quantizes them).

    A lone format targets every ``Linear`` and lists the rest under ``ignore``; several formats
    name their modules exactly, since a class target would match them all."""
    activations = activations or {}
    schemes = {name: (fmt, activations.get(name)) for name, fmt in module_formats.items()}
    distinct = sorted(set(schemes.values()), key=lambda s: (s[0].kind, s[0].bits, s[0].group_size, s[0].symmetric, str(s[1])))
    groups = {}
    for index, (fmt, act) in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else sorted(n for n, s in schemes.items() if s == (fmt, act))
        groups[f"group_{index}"] = {"targets": targets, "weights": weights_scheme(fmt),
                                    "input_activations": None if act is None else activation_scheme(act),
                                    "output_activations": None, "format": scheme_format(fmt, act)}
    formats = {scheme_format(f, a) for f, a in distinct}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
            "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None}


def module_formats(quantization: dict, packed_modules: list[str]) -> dict[str, QuantFormat]:
    """Each packed module's format, from a ``quantization_config`` written by ``quantization_config``."""
    result = {}
    for group in quantization.get("config_groups", {}).values():
        if group.get("input_activations"):
            raise ValueError("its activations are quantized (W8A8), which llmcompress reads from native checkpoints only: "
                             "load the native checkpoint it was exported from")
        fmt = format_from_scheme(group.get("weights") or {})
        targets = group.get("targets", [])
        for name in packed_modules:
            if "Linear" in targets or name in targets:
                result.setdefault(name, fmt)
    missing = sorted(set(packed_modules) - set(result))
    if missing:
        raise ValueError(f"no config group targets {', '.join(missing[:3])}")
    return result

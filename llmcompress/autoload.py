"""Native checkpoints through ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

A checkpoint carries ``remote_code.py`` and an ``auto_map`` naming its classes (``hfconfig``);
transformers imports that file and calls their ``from_pretrained``, which land here. Only the
loading options that make sense for an already-compressed checkpoint are taken; any other one is
refused by name rather than silently ignored. Importing this module registers our
``quantization_config`` with transformers, whose ``AutoQuantizationConfig`` (called by lm-eval's
``hf`` model on every config) otherwise refuses a method it does not know.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import load
from .errors import ConfigError
from .hfconfig import QUANT_METHOD
from .pipeline.placement import single_device

# What transformers' auto classes and lm-eval's ``hf`` model pass on every load: where the files
# come from and how to trust them, which for a local checkpoint decide nothing here.
_PASSED_THROUGH = {"config", "trust_remote_code", "revision", "code_revision", "local_files_only", "cache_dir", "token",
                   "force_download", "proxies", "adapter_kwargs", "low_cpu_mem_usage", "_from_auto", "_commit_hash",
                   "attn_implementation"}


class LLMCompressQuantizationConfig(QuantizationConfigMixin):
    """Our ``quantization_config`` as transformers holds it: the JSON of checkpoint.py, kept whole."""

    def __init__(self, **config) -> None:  # noqa: ANN003
        self.__dict__.update(config)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict:
        return dict(self.__dict__)


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LLMCompressQuantizationConfig)


def from_pretrained(path: str | os.PathLike, *model_args, dtype=None, torch_dtype=None, device_map=None,  # noqa: ANN001, ANN002
                    subfolder: str = "", quantization_config=None, gguf_file=None, **kwargs) -> nn.Module:  # noqa: ANN001, ANN003
    """``llmcompress.load``'s model of the checkpoint at ``path``, as transformers' ``from_pretrained``
    is asked for it: ``dtype`` (or ``torch_dtype``) converts the unquantized parameters, and
    ``device_map`` names one device (``"cpu"``, ``"cuda:0"``, ``"auto"``, or ``{"": device}``)."""
    unknown = sorted(key for key, value in kwargs.items() if key not in _PASSED_THROUGH and value is not None)
    foreign_quantization = quantization_config is not None and getattr(quantization_config, "quant_method", None) != QUANT_METHOD
    if model_args or unknown or foreign_quantization or gguf_file is not None:
        named = [*(["positional model arguments"] if model_args else []), *unknown,
                 *(["quantization_config"] if foreign_quantization else []), *(["gguf_file"] if gguf_file else [])]
        raise ConfigError(f"an llmcompress checkpoint is already compressed and loads with dtype and device_map only; "
                          f"drop {', '.join(named)}")
    location = Path(path).expanduser() / subfolder
    model, _ = load(location, device=single_device(_one_device(device_map)), dtype=_dtype(dtype if dtype is not None else torch_dtype))
    return model


def config_from_pretrained(path: str | os.PathLike, **kwargs):  # noqa: ANN003, ANN201 - what AutoConfig.from_pretrained returns
    """The checkpoint's config as its model family's own config class reads it (``LlamaConfig``...)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(path, **kwargs)
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{path}: model_type {model_type!r} is not one this transformers knows: upgrade transformers")
    return CONFIG_MAPPING[model_type].from_pretrained(path, **kwargs)


def _dtype(requested) -> torch.dtype | None:  # noqa: ANN001
    if requested is None or requested == "auto":
        return None
    if isinstance(requested, torch.dtype):
        return requested
    dtype = getattr(torch, str(requested).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype {requested!r} is not a torch dtype: use auto, float32, bfloat16 or float16")
    return dtype


def _one_device(device_map) -> str:  # noqa: ANN001
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devices = {str(device) for device in device_map.values()}
        if len(devices) != 1:
            raise ConfigError(f"device_map spreads the model over {sorted(devices)}; an llmcompress checkpoint loads onto one "
                              "device here: pass device_map='cpu', 'cuda:0' or 'auto'")
        device_map = devices.pop()
    device = str(device_map)
    return f"cuda:{device}" if device.isdigit() else device

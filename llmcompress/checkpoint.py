"""Native checkpoints: packed safetensors shards + config.json + tokenizer, written atomically.

Layout of a checkpoint directory:

- ``config.json``: the model's Hugging Face config plus ``quantization_config`` =
  ``{"quant_method": "llmcompress", "format_version": 2, "recipe": <the Recipe as run>,
  "modules": {name: {"format": <QuantFormat, or null for a 16-bit N:M sparse weight>,
  "in_features", "out_features", "g_idx", "layout": <LayerLayout: low-rank rank and dtype,
  smoothing, activation format, N:M sparse storage>}},
  "tied": {dropped: kept}}``. It is written last: a directory without it is unfinished.
- ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``:
  every tensor in its stored dtype; quantized layers hold the packed tensors of ``packing``.
- ``recipe.yaml``: the same recipe as a file; ``compress --recipe`` run on it reproduces the
  checkpoint byte for byte.
- the tokenizer files, and ``compression_report.json`` (per-layer errors of the run).
- ``llmcompress_auto.py``, named by config.json's ``auto_map``: transformers' way in, with
  ``trust_remote_code=True`` (``hfconfig``, ``autoload``).
- ``llmcompress-checksums.json``: the size and SHA-256 of every other file but config.json and
  the report (``integrity``), written just before config.json; ``load`` checks them first.

Everything is written into a hidden staging directory beside the target and renamed into place,
so an interrupted or failed save never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import integrity
from .hfconfig import AUTO_MAP, QUANT_METHOD, write_remote_code
from .config import CompressConfig, QuantFormat, _from_dict
from .flags import recipe_from_config
from .layouts import compressed_tensors, gptq
from .recipe import Recipe, recipe_yaml
from .runstate import describe_unfinished, partial_path, unfinished_run
from .version import __version__
from .errors import CheckpointError, ConfigError
from .disknames import StoredNames
from .surgery import standard_layers
from .fileio import staged_directory, staged_file
from .models import cast_model, load_model
from .nn import CompressedLinear
from .outdir import CONFIG_FILE, RECIPE_FILE, REPORT_FILE, check_output_dir
from .packing import LayerLayout, packed_spec
from .shards import INDEX_FILE, SINGLE_FILE, ShardedWeights

# Format 2 stores the recipe; format 1 stored the flag-shaped CompressConfig, still read.
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
EXPORT_QUANT_METHODS = ("compressed-tensors", "gptq")  # read here, written by llmcompress.export
DEFAULT_SHARD_BYTES = 2 * 1024**3
# config.json is the commit point, written after the record; measurements are merged into the
# report after the checkpoint is written (add_to_report).
UNRECORDED = (CONFIG_FILE, REPORT_FILE)


def unique_state_dict(model: nn.Module, exclude: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict without aliases (tied weights), and the aliases as {dropped: kept};
    names starting with ``exclude`` are left out."""
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if exclude is not None and name.startswith(exclude):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in owner:
            tied[name] = owner[key]
            continue
        owner[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, tied


def save(model: nn.Module, out_dir: str | os.PathLike, config: Recipe, tokenizer: Any = None,
         report: dict | None = None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a compressed model as a native checkpoint; returns the directory. Where ``compress``
    read the float model from is recorded, so that ``compress eval --baseline`` finds it."""
    out = check_output_dir(out_dir, overwrite)
    names = StoredNames(model)
    tensors, tied = unique_state_dict(model)
    tensors, tied = names.tensors(tensors), {names.tensor(k): names.tensor(v) for k, v in tied.items()}
    modules = {names.module(name): entry for name, entry in module_entries(model).items()}
    hf_config = checkpoint_config(model, config, modules, tied, getattr(model, "llmcompress_source_model", None))
    with staged_directory(out) as staging:
        write_shards(tensors, staging, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        write_config(hf_config, staging)
    return out


def add_to_report(path: str | os.PathLike, extra: dict) -> None:
    """Merge ``extra`` into a checkpoint's compression report (measurements taken after it was written)."""
    report_file = Path(path) / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    with staged_file(report_file) as temporary:
        temporary.write_text(json.dumps({**report, **extra}, indent=2))


def module_entries(module: nn.Module, prefix: str = "") -> dict[str, dict]:
    """The ``quantization_config["modules"]`` entries of every ``CompressedLinear`` in ``module``."""
    return {
        f"{prefix}{name}": {"format": None if m.fmt is None else dataclasses.asdict(m.fmt), "in_features": m.in_features,
                            "out_features": m.out_features, "g_idx": m.has_g_idx, "layout": dataclasses.asdict(m.layout)}
        for name, m in module.named_modules() if isinstance(m, CompressedLinear)
    }


def checkpoint_config(model: nn.Module, config: Recipe, modules: dict[str, dict], tied: dict[str, str],
                      source_model: str | None = None) -> dict:
    """config.json of a native checkpoint: the model's config plus our ``quantization_config``."""
    hf_config = model.config.to_dict()
    hf_config["architectures"] = hf_config.get("architectures") or [type(model).__name__]
    # The config's dtype can be stale after a .to(dtype); record what the tensors really are.
    hf_config["dtype"] = str(model.get_input_embeddings().weight.dtype).replace("torch.", "")
    # Only our loader: a source model's own remote code is not copied, and transformers has its classes.
    hf_config["auto_map"] = AUTO_MAP
    hf_config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmcompress_version": __version__,
        "recipe": config.to_dict(),
        "modules": modules,
        "tied": tied,
        "source_model": source_model,
    }
    return hf_config


def write_config(hf_config: dict, directory: Path, checksums: Mapping[str, dict] | None = None) -> None:
    """config.json, after the recipe beside it as a file that ``--recipe`` takes back and the
    checksums of every file written before it (``checksums`` holds those hashed as they were written)."""
    quantization = hf_config.get("quantization_config") or {}
    if quantization.get("recipe") is not None:
        (directory / RECIPE_FILE).write_text(recipe_yaml(quantization["recipe"]))
    if quantization.get("quant_method") == QUANT_METHOD:
        write_remote_code(directory)
    integrity.write_record(directory, UNRECORDED, checksums)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True, default=str))


def write_shards(tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    write_index(weight_map, sum(t.numel() * t.element_size() for t in tensors.values()), directory)


def write_index(weight_map: dict[str, str], total_bytes: int, directory: Path) -> None:
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------- loading


def read_config(path: Path) -> dict:
    if not path.exists():
        run = unfinished_run(partial_path(path))
        if run is not None:
            raise CheckpointError(f"checkpoint {path} does not exist yet: its run is unfinished in {partial_path(path)} ({describe_unfinished(run)})")
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        run = unfinished_run(path)
        if run is not None:
            raise CheckpointError(f"{path} is an unfinished run, not a checkpoint ({describe_unfinished(run)})")
        if any(path.glob("*.safetensors")) or ".incomplete-" in path.name:
            raise CheckpointError(f"{path} has weights but no {CONFIG_FILE}: it is an unfinished checkpoint; compress again")
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: it is not a model checkpoint")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}): the checkpoint is corrupt") from err


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True):  # noqa: ANN201
    """Load a checkpoint of ours as ``(model, tokenizer)`` with ``CompressedLinear`` layers.

    A plain Hugging Face directory (no llmcompress ``quantization_config``) loads as a float model.
    ``dtype`` converts the unquantized parameters only; packed tensors keep their stored dtype.
    Our compressed-tensors and GPTQ exports load too, with ``llmcompress_config`` None.
    ``verify`` first checks every file against the checksums recorded when it was written and
    names a damaged one; ``verify=False`` skips that read of the whole checkpoint.
    """
    path = Path(path).expanduser()
    raw = read_config(path)
    quantization = raw.get("quantization_config") or {}
    if verify and not integrity.verify(path) and quantization.get("quant_method") in (QUANT_METHOD, *EXPORT_QUANT_METHODS):
        warnings.warn(f"llmcompress: {path} has no {integrity.CHECKSUM_FILE} (it was written before checkpoints recorded checksums), "
                      "so its files are not verified; `compress export` of it writes a copy that has one", stacklevel=2)
    if quantization.get("quant_method") in EXPORT_QUANT_METHODS:
        tensors, quantization = _native_from_export(path, raw, quantization)
        return _build(path, quantization, tensors, None, device, dtype)
    if quantization.get("quant_method") != QUANT_METHOD:
        model, tokenizer = load_model(path, device=str(device))
        return (cast_model(model, dtype) if dtype is not None else model), tokenizer
    compress_config = _native_config(path, quantization)
    return _build(path, quantization, _read_tensors(path), compress_config, device, dtype)


def skeleton(path: str | os.PathLike) -> nn.Module:
    """The model of a native checkpoint with every tensor on the meta device: its layers, shapes
    and dtypes, without reading a weight (for size accounting of models larger than memory)."""
    path = Path(path).expanduser()
    quantization = read_config(path).get("quantization_config") or {}
    if quantization.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a native llmcompress checkpoint")
    _native_config(path, quantization)
    model, names = _empty_model(path, quantization)
    for dropped, kept in quantization.get("tied", {}).items():
        _alias(model, names.tensor(dropped, to_disk=False), names.tensor(kept, to_disk=False))
    return model


def _native_config(path: Path, quantization: dict) -> Recipe:
    """The recipe a native checkpoint was made with (format 1 stored the flag-shaped config)."""
    version = quantization.get("format_version")
    if version not in (LEGACY_FORMAT_VERSION, FORMAT_VERSION):
        raise CheckpointError(f"{path} uses checkpoint format {version}; this llmcompress reads formats "
                              f"{LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}: upgrade llmcompress")
    key = "config" if version == LEGACY_FORMAT_VERSION else "recipe"
    missing_keys = [k for k in (key, "modules") if k not in quantization]
    if missing_keys:
        raise CheckpointError(f"{path / CONFIG_FILE}: quantization_config lacks {', '.join(missing_keys)}: the checkpoint is corrupt")
    try:
        if version == LEGACY_FORMAT_VERSION:
            return recipe_from_config(CompressConfig.from_dict(quantization[key]))
        return Recipe.from_dict(quantization[key])
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: its compression config is invalid ({err}): the checkpoint is corrupt") from err


def _empty_model(path: Path, quantization: dict) -> tuple[nn.Module, StoredNames]:
    """The model of ``path``'s config on the meta device, with ``CompressedLinear`` layers as
    ``quantization["modules"]`` says, and the names its checkpoint gives its modules."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    stored_dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(stored_dtype, str):
        stored_dtype = getattr(torch, stored_dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=stored_dtype)
    standard_layers(model)  # compression saw, and wrote, one Linear per expert and no Conv1D
    names = StoredNames(model)  # checkpoints name experts as the family's own checkpoints do
    for name, entry in quantization["modules"].items():
        _install_compressed(model, names.module(name, to_disk=False), entry, stored_dtype)
    return model, names


def _build(path: Path, quantization: dict, tensors: dict[str, Tensor], compress_config: Recipe | None,
           device: str | torch.device, dtype: torch.dtype | None):  # noqa: ANN202 - (model, tokenizer)
    """The model of ``path``'s config with ``CompressedLinear`` layers as ``quantization["modules"]`` says."""
    model, names = _empty_model(path, quantization)
    tensors = names.tensors(tensors, to_disk=False)
    tied = {names.tensor(k, to_disk=False): names.tensor(v, to_disk=False) for k, v in quantization.get("tied", {}).items()}
    _check_tensors(model, tensors, tied, path)
    model.load_state_dict(tensors, strict=False, assign=True)
    for dropped, kept in tied.items():
        _alias(model, dropped, kept)
    model.config.quantization_config = quantization
    model.llmcompress_config = compress_config
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.to(device).eval(), _load_tokenizer(path)


def _native_from_export(path: Path, raw: dict, quantization: dict) -> tuple[dict[str, Tensor], dict]:
    """A compressed-tensors or GPTQ directory (as ``llmcompress.export`` writes them) as our
    tensors and ``quantization_config``: the packed layers' tensors converted, the rest as they are."""
    method = quantization["quant_method"]
    reader = gptq if method == gptq.QUANT_METHOD else compressed_tensors
    tensors = _read_tensors(path)
    marker = f".{reader.PACKED_TENSOR}"
    packed_modules = sorted(name[: -len(marker)] for name in tensors if name.endswith(marker))
    try:
        formats = reader.module_formats(quantization, packed_modules)
    except (ConfigError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: {err}: llmcompress reads the {method} exports it writes") from err
    modules = {}
    for name in packed_modules:
        fmt = formats[name]
        local = {key.rpartition(".")[2]: tensors.pop(key) for key in [k for k in tensors if k.rpartition(".")[0] == name]}
        bias = local.pop("bias", None)
        try:
            native, in_features, has_g_idx = reader.native_layer(fmt, local)
        except KeyError as err:
            raise CheckpointError(f"{path}: {method} layer {name} lacks {err}: the export is corrupt") from err
        modules[name] = {"format": dataclasses.asdict(fmt), "in_features": in_features, "out_features": native["weight_scale"].shape[0],
                         "g_idx": has_g_idx, "layout": dataclasses.asdict(LayerLayout())}
        tensors.update({f"{name}.{key}": tensor for key, tensor in native.items()})
        if bias is not None:
            tensors[f"{name}.bias"] = bias
    tied = {}
    if raw.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        embedding = next((k for k in tensors if k.endswith("embed_tokens.weight")), None)
        if embedding is not None:
            tied["lm_head.weight"] = embedding
    return tensors, {"quant_method": method, "modules": modules, "tied": tied,
                     "source": {key: value for key, value in quantization.items() if key != "config_groups"}}


def _install_compressed(model: nn.Module, name: str, entry: dict, dtype: torch.dtype) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
    except AttributeError as err:
        raise CheckpointError(f"config lists quantized module {name}, which this model architecture does not have: the checkpoint is corrupt") from err
    try:
        fmt = None if entry["format"] is None else _from_dict(QuantFormat, entry["format"])
        layout = _from_dict(LayerLayout, entry.get("layout", {}))
        packed_spec(fmt, entry["out_features"], entry["in_features"], layout=layout)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"config entry of quantized module {name} is invalid ({err}): the checkpoint is corrupt") from err
    if (original.in_features, original.out_features) != (entry["in_features"], entry["out_features"]):
        raise CheckpointError(f"{name} is {entry['out_features']}x{entry['in_features']} in the checkpoint but {original.out_features}x{original.in_features} in the model config")
    # On the meta device: loading assigns the stored tensors, so nothing is allocated twice.
    setattr(parent, child, CompressedLinear(entry["in_features"], entry["out_features"], fmt, bias=original.bias is not None,
                                            dtype=dtype, device="meta", has_g_idx=bool(entry.get("g_idx", False)), layout=layout))


def _read_tensors(path: Path) -> dict[str, Tensor]:
    weights = ShardedWeights(path, error=CheckpointError, remedy="compress again", when_absent="the checkpoint is incomplete")
    return weights.read(weights.location)


def _check_tensors(model: nn.Module, tensors: dict[str, Tensor], tied: dict[str, str], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:5])}" if missing else "") + (f" unexpected {', '.join(unexpected[:5])}" if unexpected else "")
        raise CheckpointError(f"{path} does not match its config ({detail.strip()}): the checkpoint is corrupt")
    packed = {f"{name}.{tensor}" for name, module in model.named_modules() if isinstance(module, CompressedLinear) for tensor in module.packed_names}
    for name, tensor in tensors.items():
        want = expected[name]
        # Packed tensors must match exactly; float tensors may be stored in any float dtype.
        dtype_ok = tensor.dtype == want.dtype if name in packed else tensor.is_floating_point() == want.is_floating_point()
        if tuple(tensor.shape) != tuple(want.shape) or not dtype_ok:
            raise CheckpointError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected {want.dtype} {tuple(want.shape)}: the checkpoint is corrupt")
        if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} contains NaN or Inf: the checkpoint is corrupt")


def _alias(model: nn.Module, dropped: str, kept: str) -> None:
    owner_name, _, attribute = dropped.rpartition(".")
    kept_owner, _, kept_attribute = kept.rpartition(".")
    source = model.get_submodule(kept_owner)
    target = model.get_submodule(owner_name)
    tensor = getattr(source, kept_attribute)
    if attribute in target._parameters:
        target._parameters[attribute] = tensor
    else:
        target._buffers[attribute] = tensor


def _load_tokenizer(path: Path):  # noqa: ANN202
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the tokenizer in {path} cannot be read ({err}): the checkpoint is corrupt") from err


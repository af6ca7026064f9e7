"""The Python API: ``compress`` a model, then ``load`` what it wrote."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed
from .calib import calibration_windows
from .checkpoint import check_output_dir, checkpoint_config, save, unique_state_dict
from .errors import CalibrationError, ConfigError, LLMCompressError, ModelError
from .flags import RecipeLike, as_recipe
from .lock import output_lock
from .memory import pin_mmap_threshold
from .models import load_model, load_tokenizer, resolve_model_dir
from .pipeline import CompressionReport, compress_blocks, find_decoder_blocks
from .pipeline.coverage import plan_coverage
from .pipeline.structure import plan_layers
from .disknames import CheckpointNames
from .pipeline.sharded import check_head, materialize_head, materialize_outside, meta_model
from .recipe import Recipe
from .rundir import RunDirectory
from .shards import ShardedWeights
from .streaming import DiskStream, LendingStream
from .version import __version__


def compress(model: nn.Module | str | os.PathLike | None, recipe: RecipeLike | None = None, *,
             calibration: str | Tensor | None = None, output_dir: str | os.PathLike | None = None,
             tokenizer=None, device: str = "cpu", overwrite: bool = False, progress: bool = True, activations: str = "auto",  # noqa: ANN001
             offload_dir: str | os.PathLike | None = None, strict: bool = False) -> nn.Module:
    """Compress ``model`` (a module, a path / hub id, or None for the bundled default) in place,
    as ``recipe`` says (a ``Recipe``, a dict, a YAML file's path, or a ``CompressConfig``).

    ``calibration`` is a text source (see ``llmcompress.calib``) or token windows
    [nsamples, seqlen]; when None, methods that need data use ``config.calib.source`` and
    data-free methods (RTN) skip the calibration pass. With calibration, every layer's output
    error on it is measured and reported. The returned model carries ``compression_report``
    and ``llmcompress_config`` (the recipe as run); with ``output_dir`` it is also saved there as a checkpoint.
    ``activations`` and ``offload_dir`` say where the calibration activations between blocks
    are kept (see ``pipeline.compress_blocks``). ``device``: "cpu", "cuda[:N]", or "auto" (the
    blocks spread over the visible GPUs, see ``pipeline.placement``). ``strict`` refuses to start
    when a weight would be left uncompressed without an explicit skip (``report.coverage`` lists
    every weight and why it is or is not compressed).
    """
    config = as_recipe(recipe)
    _check_device(device)
    # Across processes (``llmcompress.distributed``) the first one writes; the others lend it their share.
    output_dir = output_dir if distributed.is_main() else None
    with nullcontext() if output_dir is None else output_lock(output_dir):
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)
        source_model = None
        if model is None or isinstance(model, (str, os.PathLike)):
            source_model = resolve_model_dir(model)
            model, loaded_tokenizer = load_model(model)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        windows = _calibration_windows(config, calibration, tokenizer)
        effective = _effective_config(config, calibration, windows)
        report = compress_blocks(model, effective, windows, device=device, progress=progress, activations=activations,
                                 offload_dir=offload_dir, strict=strict)
        model.llmcompress_config = effective
        model.compression_report = report
        model.llmcompress_source_model = source_model
        if output_dir is not None:
            save(model, output_dir, effective, tokenizer=tokenizer, report=report.to_dict(), overwrite=overwrite)
        return model


def compress_to_disk(model: str | os.PathLike | None, recipe: RecipeLike | None, output_dir: str | os.PathLike, *,
                     calibration: str | Tensor | None = None, device: str = "cpu", resume: bool = False, overwrite: bool = False,
                     progress: bool = True, command: str | None = None, activations: str = "auto",
                     offload_dir: str | os.PathLike | None = None, strict: bool = False) -> tuple[Path, CompressionReport]:
    """Compress a model directory (or .gguf, or None for the bundled default) into a native
    checkpoint at ``output_dir`` without ever holding the whole model in memory.

    Blocks are read from the safetensors shards one at a time and committed to
    ``output_dir + ".partial"`` as they finish; ``resume=True`` continues an interrupted run
    from its last committed block (same model, config and calibration, which is checked) and
    gives a checkpoint byte-identical to an uninterrupted run. ``command`` is the command line
    that started the run, quoted back to the user when it has to be resumed. ``activations`` and
    ``offload_dir`` say where the calibration activations between blocks are kept (see
    ``pipeline.compress_blocks``); ``device`` and ``strict`` are as for ``compress``.
    """
    pin_mmap_threshold()  # first: tokenising the calibration text fragments the heap too
    config = as_recipe(recipe)
    _check_device(device)
    if resume and distributed.active():
        raise ConfigError("--resume does not work under torchrun (each process keeps only its share of the calibration activations): "
                          "start the run again with --overwrite")
    if model is not None and not Path(model).expanduser().exists() and str(model) != "default":
        raise ModelError(f"model path {str(model)!r} does not exist: check the path (compressing block by block needs a local model)")
    model_dir = Path(resolve_model_dir(model))
    weights = ShardedWeights(model_dir)
    skeleton = meta_model(model_dir)
    blocks_path, blocks = find_decoder_blocks(skeleton)
    targets, left = plan_layers(blocks, blocks_path, config)  # a recipe that compresses nothing fails here, before any file is touched
    if strict:
        plan_coverage(skeleton, blocks_path, blocks, targets, left).check_strict()
    # Where each of the skeleton's tensors lies in the shards, found once for every read below.
    names = CheckpointNames(skeleton, weights.location)
    check_head(skeleton, weights, names)  # and a head the shards lack, before hours of blocks
    tokenizer = load_tokenizer(model_dir)
    windows = _calibration_windows(config, calibration, tokenizer)
    effective = _effective_config(config, calibration, windows)
    identity = {
        "model": str(model_dir.resolve()),
        "model_files": {file.name: file.stat().st_size for file in weights.files},
        "config": effective.to_dict(),
        "calibration_sha256": None if windows is None else hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "num_blocks": len(blocks),
        "llmcompress_version": __version__,
        "torch_version": torch.__version__,
    }
    if distributed.active():
        # Its committed activations are process 0's share only: no run of another size may resume it.
        identity["processes"] = distributed.world()
    if not distributed.is_main():
        _materialize_for(skeleton, blocks_path, weights, names, effective)
        report = compress_blocks(skeleton, effective, windows, device=device, progress=False,
                                 store=LendingStream(weights, blocks_path, skeleton, names),
                                 activations=activations, offload_dir=offload_dir, strict=strict)
        return Path(output_dir), report
    with output_lock(output_dir):
        run = RunDirectory(output_dir, identity, resume=resume, overwrite=overwrite, command=command)
        try:
            _materialize_for(skeleton, blocks_path, weights, names, effective)
            stream = DiskStream(weights, run, blocks_path, skeleton, names)
            report = compress_blocks(skeleton, effective, windows, device=device, progress=progress, store=stream, activations=activations,
                                     offload_dir=offload_dir, strict=strict)
            materialize_head(skeleton, weights, names)
            outside, tied = unique_state_dict(skeleton, exclude=f"{blocks_path}.")
            stored = stream.stored
            outside, tied = stored.tensors(outside), {stored.tensor(k): stored.tensor(v) for k, v in tied.items()}
            hf_config = checkpoint_config(skeleton, effective, run.modules(), tied, source_model=str(model_dir.resolve()))
            return run.finish(outside, hf_config, tokenizer, report.to_dict()), report
        except LLMCompressError as err:
            # A failure leaves no half-written output behind, only committed blocks that --resume continues from.
            raise type(err)(f"{err} ({run.abandon()})") from err


def _materialize_for(skeleton: nn.Module, blocks_path: str, weights: ShardedWeights, names: CheckpointNames, recipe: Recipe) -> None:
    """What the blocks' forwards need from outside them; and the head too where a pass rewrites
    the whole model before the blocks (a rotation folds the final norm into it)."""
    materialize_outside(skeleton, blocks_path, weights, "cpu", names)
    if recipe.rewrites_model:
        materialize_head(skeleton, weights, names)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but PyTorch sees no CUDA GPU: use device='cpu'")


def _effective_config(config: Recipe, calibration: str | Tensor | None, windows: Tensor | None) -> Recipe:
    """The configuration as run: the calibration it really used."""
    source = "none" if windows is None else ("token windows" if isinstance(calibration, Tensor) else calibration or config.calib.source)
    calib = dataclasses.replace(config.calib, source=source)
    if windows is not None:
        calib = dataclasses.replace(calib, nsamples=windows.shape[0], seqlen=windows.shape[1])
    return config.with_calib(calib)


def _calibration_windows(config: Recipe, calibration: str | Tensor | None, tokenizer) -> Tensor | None:  # noqa: ANN001
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise CalibrationError(f"calibration token windows must be a 2-D long tensor [nsamples, seqlen], got {calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    source = calibration if calibration is not None else (config.calib.source if config.needs_calibration else None)
    if source is None or source.strip().lower() == "none":
        if config.needs_calibration:
            raise CalibrationError(f"{', '.join(config.calibrated_passes())} needs calibration data: give a text source, not 'none'")
        return None
    if tokenizer is None:
        raise CalibrationError("calibration text needs the model's tokenizer: pass tokenizer=..., or token windows as calibration=")
    calib = config.calib
    return calibration_windows(source, tokenizer, calib.nsamples, calib.seqlen, calib.seed)

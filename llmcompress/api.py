"""The Python API: ``compress`` a model, then ``load`` what it wrote."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor, nn

from .calib import calibration_windows
from .checkpoint import check_output_dir, save
from .config import CompressConfig
from .errors import CalibrationError, ConfigError
from .models import load_model
from .pipeline import compress_blocks


def compress(model: nn.Module | str | os.PathLike | None, config: CompressConfig | None = None, *,
             calibration: str | Tensor | None = None, output_dir: str | os.PathLike | None = None,
             tokenizer=None, device: str = "cpu", overwrite: bool = False, progress: bool = True) -> nn.Module:  # noqa: ANN001
    """Compress ``model`` (a module, a path / hub id, or None for the bundled default) in place.

    ``calibration`` is a text source (see ``llmcompress.calib``) or token windows
    [nsamples, seqlen]; when None, methods that need data use ``config.calib.source`` and
    data-free methods (RTN) skip the calibration pass. With calibration, every layer's output
    error on it is measured and reported. The returned model carries ``compression_report``
    and ``llmcompress_config``; with ``output_dir`` it is also saved there as a checkpoint.
    """
    config = config or CompressConfig()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but PyTorch sees no CUDA GPU: use device='cpu'")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if model is None or isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    windows = _calibration_windows(config, calibration, tokenizer)
    source = "none" if windows is None else ("token windows" if isinstance(calibration, Tensor) else calibration or config.calib.source)
    calib = dataclasses.replace(config.calib, source=source)
    if windows is not None:
        calib = dataclasses.replace(calib, nsamples=windows.shape[0], seqlen=windows.shape[1])
    effective = dataclasses.replace(config, calib=calib)
    report = compress_blocks(model, effective, windows, device=device, progress=progress)
    model.llmcompress_config = effective
    model.compression_report = report
    if output_dir is not None:
        save(model, output_dir, effective, tokenizer=tokenizer, report=report.to_dict(), overwrite=overwrite)
    return model


def _calibration_windows(config: CompressConfig, calibration: str | Tensor | None, tokenizer) -> Tensor | None:  # noqa: ANN001
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise CalibrationError(f"calibration token windows must be a 2-D long tensor [nsamples, seqlen], got {calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    source = calibration if calibration is not None else (config.calib.source if config.needs_calibration else None)
    if source is None or source.strip().lower() == "none":
        if config.needs_calibration:
            needs = (f"method {config.method!r}" if config.method != "rtn" else
                     f"pruning method {config.prune.method!r}" if config.prune.uses_calibration else
                     f"low-rank method {config.lowrank.method!r}")
            raise CalibrationError(f"{needs} needs calibration data: give a text source, not 'none'")
        return None
    if tokenizer is None:
        raise CalibrationError("calibration text needs the model's tokenizer: pass tokenizer=..., or token windows as calibration=")
    calib = config.calib
    return calibration_windows(source, tokenizer, calib.nsamples, calib.seqlen, calib.seed)

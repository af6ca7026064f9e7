"""A report grid: one model, one protocol, a list of named configurations (read from YAML).

    model: default                  # a model directory, a .gguf file, or default
    device: cpu
    calibration: {source: austen:train, nsamples: 128, seqlen: 512, seed: 0}
    evaluation: {text: austen:test, seqlen: 1024, windows: 40}
    heatmaps: [rtn-w4g128, gptq-w4g128]   # configurations whose per-layer error is drawn
    configurations:
      - {name: float16, float: true}
      - {name: rtn-w4g128, args: --method rtn --bits 4 --group-size 128}

A configuration's ``args`` are `compress` options, exactly as typed on the command line; the
protocol (calibration, evaluation, device, output) belongs to the grid, so that every
configuration is measured the same way and the options that set it are refused in ``args``.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..pipeline.placement import DEVICES

# Options that the grid itself sets for every configuration.
PROTOCOL_OPTIONS = ("--out", "--overwrite", "--resume", "--calib", "--nsamples", "--seqlen", "--seed", "--eval", "--no-eval",
                    "--eval-text", "--eval-seqlen", "--eval-windows", "--device", "--export", "--adapter", "--no-adapter")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Protocol:
    """How every configuration is calibrated and evaluated."""

    calib: str = "austen:train"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    text: str = "austen:test"
    eval_seqlen: int = 1024
    eval_windows: int = 40  # 0: the whole text

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen", "eval_seqlen"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"grid protocol: {name}={getattr(self, name)!r} must be a positive integer")
        if not isinstance(self.eval_windows, int) or self.eval_windows < 0:
            raise ConfigError(f"grid protocol: windows={self.eval_windows!r} must be an integer >= 0 (0 = the whole text)")

    def compress_options(self) -> list[str]:
        return ["--calib", self.calib, "--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen), "--seed", str(self.seed)]

    def eval_options(self) -> list[str]:
        return ["--text", self.text, "--seqlen", str(self.eval_seqlen), "--windows", str(self.eval_windows)]

    def to_dict(self) -> dict:
        return {"calibration": {"source": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed},
                "evaluation": {"text": self.text, "seqlen": self.eval_seqlen, "windows": self.eval_windows}}


@dataclass(frozen=True)
class Configuration:
    """One row of the report: `compress` options, or the float model itself."""

    name: str
    args: tuple[str, ...] = ()
    is_float: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(f"grid configuration name {self.name!r}: use letters, digits and . _ + - (it names a directory)")
        if self.is_float and self.args:
            raise ConfigError(f"grid configuration {self.name!r} is the float model: it takes no args")
        if not self.is_float and not self.args:
            raise ConfigError(f"grid configuration {self.name!r} has no args: give compress options, or float: true")
        for arg in self.args:
            option = arg.partition("=")[0]
            if option in PROTOCOL_OPTIONS:
                raise ConfigError(f"grid configuration {self.name!r} sets {option}, which the grid sets for every configuration: "
                                  "remove it from args (calibration and evaluation go in the grid's calibration: and evaluation:)")

    def to_dict(self) -> dict:
        return {"name": self.name, "args": shlex.join(self.args), "float": self.is_float}


@dataclass(frozen=True)
class Grid:
    configurations: tuple[Configuration, ...]
    protocol: Protocol = Protocol()
    model: str | None = None  # None: the bundled default
    device: str = "cpu"
    heatmaps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.configurations:
            raise ConfigError("the grid has no configurations: list some under configurations:")
        names = [c.name for c in self.configurations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"grid configuration names must be unique; repeated: {', '.join(repeated)}")
        if sum(c.is_float for c in self.configurations) > 1:
            raise ConfigError("the grid lists the float model more than once: keep one configuration with float: true")
        unknown = [n for n in self.heatmaps if n not in names]
        if unknown:
            raise ConfigError(f"grid heatmaps name configurations that are not in the grid: {', '.join(unknown)}")
        if self.device not in DEVICES:
            raise ConfigError(f"grid device {self.device!r}: use one of {', '.join(DEVICES)}")

    @property
    def float_configuration(self) -> Configuration | None:
        return next((c for c in self.configurations if c.is_float), None)

    def with_model(self, model: str | None) -> Grid:
        return dataclasses.replace(self, model=model)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file; every error names the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist: give a YAML grid (see `compress report --help`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path}: expected a mapping with configurations:, got {type(data).__name__}")
    try:
        return _grid_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"grid file {path}: {err}") from err


def _grid_from_dict(data: dict[str, Any]) -> Grid:
    _check_keys("the grid", data, ("model", "device", "calibration", "evaluation", "heatmaps", "configurations"))
    calibration = data.get("calibration") or {}
    evaluation = data.get("evaluation") or {}
    _check_keys("calibration", calibration, ("source", "nsamples", "seqlen", "seed"))
    _check_keys("evaluation", evaluation, ("text", "seqlen", "windows"))
    defaults = Protocol()
    protocol = Protocol(calib=str(calibration.get("source", defaults.calib)), nsamples=calibration.get("nsamples", defaults.nsamples),
                        seqlen=calibration.get("seqlen", defaults.seqlen), seed=calibration.get("seed", defaults.seed),
                        text=str(evaluation.get("text", defaults.text)), eval_seqlen=evaluation.get("seqlen", defaults.eval_seqlen),
                        eval_windows=evaluation.get("windows", defaults.eval_windows))
    entries = data.get("configurations")
    if not isinstance(entries, list):
        raise ConfigError("configurations: must be a list of {name:, args:} or {name:, float: true}")
    configurations = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"configuration {entry!r}: expected a mapping with name: and args:")
        _check_keys(f"configuration {entry.get('name')!r}", entry, ("name", "args", "float"))
        args = entry.get("args") or ""
        configurations.append(Configuration(name=str(entry.get("name")), args=tuple(shlex.split(str(args))),
                                            is_float=bool(entry.get("float", False))))
    model = data.get("model")
    return Grid(configurations=tuple(configurations), protocol=protocol,
                model=None if model in (None, "default") else str(model), device=str(data.get("device", "cpu")),
                heatmaps=tuple(str(n) for n in data.get("heatmaps") or ()))


def _check_keys(owner: str, data: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{owner}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{owner}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")

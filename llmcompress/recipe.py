"""A recipe: the ordered passes of a compression run, with their options, targets, ignores and
per-module overrides, plus the calibration they read. It is what a run is made of: the CLI's
flags build one, a YAML file spells one out, and every checkpoint stores the one that made it.

    calibration: {source: austen:train, nsamples: 128, seqlen: 512, seed: 0, batch_size: 8}
    ignore: ['layers\\.0\\.']            # modules no pass touches (re.search on full names)
    passes:
    - smooth: {method: awq}
    - quantize:
        method: gptq
        bits: 4
        group_size: 128
        overrides:                      # the first matching pattern wins
        - {pattern: down_proj, bits: 8}
    - lowrank: {method: eora, rank: 32, targets: [mlp]}
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import CalibConfig
from .errors import ConfigError
from .passes import Pass, PassConfig, pass_class

CALIBRATION_KEY = "calibration"
_OVERRIDE_KEYS = ("pattern", "skip")


@dataclasses.dataclass(frozen=True)
class Override:
    """Other options for the modules whose full name matches ``pattern`` (``re.search``), or
    ``skip`` to leave them out of this pass."""

    pattern: str
    skip: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check_pattern(self.pattern, "override pattern")
        if self.skip and self.options:
            raise ConfigError(f"override {self.pattern!r} both skips the modules and sets {', '.join(k for k, _ in self.options)}: "
                              "give one or the other")

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, **({"skip": True} if self.skip else {}), **dict(self.options)}


@dataclasses.dataclass(frozen=True)
class PassEntry:
    """One pass of a recipe: its kind, its config, the modules it targets (patterns; empty: every
    Linear in the decoder blocks) and its per-module overrides."""

    kind: str
    config: PassConfig
    targets: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        expected = pass_class(self.kind).config_class
        if type(self.config) is not expected:
            raise ConfigError(f"pass {self.kind!r} takes a {expected.__name__}, got {type(self.config).__name__}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for pattern in self.targets:
            _check_pattern(pattern, "target pattern")
        for override in self.overrides:
            try:
                self.config.with_options(**dict(override.options))
            except (ConfigError, TypeError) as err:
                raise ConfigError(f"override {override.pattern!r}: {_option_error(err, self.config)}") from err

    def resolve(self, name: str) -> PassConfig | None:
        """This pass's config for one module, None where it leaves the module alone."""
        if self.targets and not any(re.search(p, name) for p in self.targets):
            return None
        override = next((o for o in self.overrides if o.matches(name)), None)
        if override is None or not override.options:
            return None if override is not None and override.skip else self.config
        return self.config.with_options(**dict(override.options))

    def variants(self) -> list[PassConfig]:
        """Every config this pass may run with: its own and each override's."""
        return [self.config, *(self.config.with_options(**dict(o.options)) for o in self.overrides if o.options)]

    def to_dict(self) -> dict[str, Any]:
        body = self.config.to_dict()
        if self.targets:
            body["targets"] = list(self.targets)
        if self.overrides:
            body["overrides"] = [o.to_dict() for o in self.overrides]
        return {self.kind: body}


@dataclasses.dataclass(frozen=True)
class Recipe:
    passes: tuple[PassEntry, ...]
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not self.passes:
            raise ConfigError("the recipe has no passes: add at least one (e.g. '- quantize: {bits: 4}')")
        for pattern in self.ignore:
            _check_pattern(pattern, "ignore pattern")
        seen: list[str] = []
        layer_seen = None
        for index, entry in enumerate(self.passes):
            cls = pass_class(entry.kind)
            missing = [kind for kind in cls.after if kind not in seen]
            if missing:
                raise ConfigError(f"recipe passes[{index}] ({entry.kind}) must come after a {' and a '.join(missing)} pass: "
                                  f"it works on what {'that pass leaves' if len(missing) == 1 else 'those passes leave'}; "
                                  f"move it below, or add the missing pass before it")
            if cls.phase == "model" and len(seen) > sum(pass_class(kind).phase == "model" for kind in seen):
                raise ConfigError(f"recipe passes[{index}] ({entry.kind}) rewrites the whole model before any block is calibrated, "
                                  "so it must come before every other kind of pass: move it to the top")
            if cls.phase == "model" and (entry.targets or entry.overrides):
                raise ConfigError(f"recipe passes[{index}] ({entry.kind}) applies to the whole model: it takes no targets or "
                                  "overrides (its own options say which layers it treats)")
            if cls.phase == "block" and layer_seen is not None:
                raise ConfigError(f"recipe passes[{index}] ({entry.kind}) searches on the float block, so it must come before "
                                  f"passes[{layer_seen}] ({self.passes[layer_seen].kind}): move it up")
            if cls.phase == "layer" and layer_seen is None:
                layer_seen = index
            seen.append(entry.kind)
        if layer_seen is None:
            raise ConfigError("the recipe has no pass that compresses a layer (prune, quantize, ...): add one")

    def instantiate(self) -> list[Pass]:
        return [pass_class(entry.kind)(index) for index, entry in enumerate(self.passes)]

    def configs_for(self, name: str) -> tuple[PassConfig | None, ...] | None:
        """Each pass's config for a module (None where a pass leaves it alone), or None when the
        recipe ignores the module altogether."""
        if any(re.search(p, name) for p in self.ignore):
            return None
        configs = tuple(None if pass_class(entry.kind).phase == "model" else entry.resolve(name) for entry in self.passes)
        return None if all(c is None for c in configs) else configs

    def names_explicitly(self, name: str) -> bool:
        """Whether some pass's ``targets`` pick out this module (an empty ``targets`` picks all)."""
        return any(entry.targets and any(re.search(p, name) for p in entry.targets) for entry in self.passes)

    def _variants(self) -> Iterable[PassConfig]:
        for entry in self.passes:
            yield from entry.variants()

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self._variants())

    @property
    def rewrites_model(self) -> bool:
        """Whether a pass rewrites the whole model (embeddings and head too) before the blocks."""
        return any(pass_class(entry.kind).phase == "model" for entry in self.passes)

    @property
    def sequential(self) -> bool:
        return any(c.sequential for c in self._variants())

    def calibrated_passes(self) -> list[str]:
        return [f"{entry.kind} ({entry.config.describe()})" for entry in self.passes if any(c.needs_calibration for c in entry.variants())]

    def describe(self) -> str:
        return " + ".join(entry.config.describe() for entry in self.passes)

    def report_labels(self) -> dict[str, Any]:
        """The run's labels for report tables: each pass's, with the methods joined by '+'."""
        labels: dict[str, Any] = {"method": "none", "weights": "16-bit", "branch": "", "pruning": "", "rank": 0, "lowrank_method": None}
        methods = []
        for entry in self.passes:
            own = entry.config.report_labels()
            if "method" in own:
                methods.append(own.pop("method"))
            labels.update(own)
        if methods:
            labels["method"] = "+".join(methods)
        return labels

    def summary_notes(self) -> list[str]:
        return [note for entry in self.passes if (note := entry.config.summary_note())]

    def with_calib(self, calib: CalibConfig) -> Recipe:
        return dataclasses.replace(self, calib=calib)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {CALIBRATION_KEY: dataclasses.asdict(self.calib)}
        if self.ignore:
            data["ignore"] = list(self.ignore)
        data["passes"] = [entry.to_dict() for entry in self.passes]
        return data

    def to_yaml(self) -> str:
        return recipe_yaml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe is a mapping with 'passes' (and optionally 'calibration', 'ignore'), got {type(data).__name__}")
        unknown = sorted(set(data) - {CALIBRATION_KEY, "ignore", "passes"})
        if unknown:
            raise ConfigError(f"recipe has unknown key(s) {', '.join(map(str, unknown))}: the keys are calibration, ignore, passes")
        passes = data.get("passes")
        if not isinstance(passes, list):
            raise ConfigError("recipe 'passes' must be a list such as [{quantize: {bits: 4}}]")
        calib_data = data.get(CALIBRATION_KEY) or {}
        try:
            calib = CalibConfig(**calib_data) if isinstance(calib_data, Mapping) else CalibConfig(source=calib_data)
        except TypeError as err:
            known = ", ".join(f.name for f in dataclasses.fields(CalibConfig))
            raise ConfigError(f"recipe calibration: {err}; its options are {known}") from err
        ignore = data.get("ignore") or []
        if isinstance(ignore, str) or not isinstance(ignore, list):
            raise ConfigError("recipe 'ignore' must be a list of patterns")
        return cls(passes=tuple(_entry(index, item) for index, item in enumerate(passes)), calib=calib, ignore=tuple(ignore))

    def with_settings(self, assignments: Iterable[str]) -> Recipe:
        """The recipe with ``KIND.OPTION=VALUE`` (or ``passes.N.OPTION=VALUE``, or
        ``calibration.OPTION=VALUE``) applied; values are read as YAML (3, true, null, -1)."""
        data = self.to_dict()
        for assignment in assignments:
            path, eq, text = assignment.partition("=")
            if not eq:
                raise ConfigError(f"--set {assignment!r}: expected KIND.OPTION=VALUE, e.g. quantize.bits=3")
            value = yaml.safe_load(text) if text.strip() else None
            _body(data, path.strip(), assignment)[path.strip().rsplit(".", 1)[-1]] = value
        return Recipe.from_dict(data)


def recipe_yaml(data: Mapping[str, Any]) -> str:
    """A recipe's dict (``Recipe.to_dict``) as the YAML of a recipe file, keys in recipe order."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)


def _body(data: dict, path: str, assignment: str) -> dict:
    """The mapping a ``--set`` path writes into."""
    parts = path.split(".")
    if len(parts) == 2 and parts[0] == CALIBRATION_KEY:
        return data[CALIBRATION_KEY]
    kinds = [next(iter(entry)) for entry in data["passes"]]
    if len(parts) == 3 and parts[0] == "passes" and parts[1].isdigit() and int(parts[1]) < len(kinds):
        return data["passes"][int(parts[1])][kinds[int(parts[1])]]
    if len(parts) == 2 and kinds.count(parts[0]) == 1:
        return data["passes"][kinds.index(parts[0])][parts[0]]
    if len(parts) == 2 and kinds.count(parts[0]) > 1:
        raise ConfigError(f"--set {assignment!r}: the recipe has {kinds.count(parts[0])} {parts[0]} passes; "
                          f"name one as passes.N.OPTION (N = {', '.join(str(i) for i, k in enumerate(kinds) if k == parts[0])})")
    raise ConfigError(f"--set {assignment!r}: no such place in the recipe; its passes are {', '.join(kinds)} "
                      f"(write KIND.OPTION, passes.N.OPTION or calibration.OPTION)")


def _entry(index: int, item: Any) -> PassEntry:
    where = f"recipe passes[{index}]"
    if not isinstance(item, Mapping) or len(item) != 1:
        raise ConfigError(f"{where}: each pass is a one-key mapping such as {{quantize: {{bits: 4}}}}, got {item!r}")
    kind, body = next(iter(item.items()))
    body = dict(body or {})
    try:
        config_class = pass_class(kind).config_class
        targets = body.pop("targets", []) or []
        if isinstance(targets, str):
            targets = [targets]
        overrides = tuple(_override(o) for o in body.pop("overrides", []) or [])
        return PassEntry(kind=kind, config=config_class.from_dict(body), targets=tuple(targets), overrides=overrides)
    except ConfigError as err:
        raise ConfigError(f"{where} ({kind}): {err}") from err
    except TypeError as err:
        raise ConfigError(f"{where} ({kind}): {err}") from err


def _override(item: Any) -> Override:
    if not isinstance(item, Mapping) or "pattern" not in item:
        raise ConfigError(f"an override is a mapping with a 'pattern' and options, e.g. {{pattern: down_proj, bits: 8}}; got {item!r}")
    options = tuple((k, v) for k, v in item.items() if k not in _OVERRIDE_KEYS)
    return Override(pattern=item["pattern"], skip=bool(item.get("skip", False)), options=options)


def _option_error(err: Exception, config: PassConfig) -> str:
    if isinstance(err, TypeError):
        known = ", ".join(f.name for f in dataclasses.fields(config))
        return f"{err}; the options are {known}"
    return str(err)


def _check_pattern(pattern: Any, what: str) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} {pattern!r} must be a string (a regular expression)")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression ({err})") from err


def load_recipe(source: Recipe | Mapping | str | os.PathLike) -> Recipe:
    """A recipe object, a dict, or the path of a YAML file."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist: give the path of a YAML recipe (compress --print-recipe writes one)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe file {path} is not valid YAML ({err})") from err
    try:
        return Recipe.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err

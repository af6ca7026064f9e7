"""Reading the state an unfinished block-by-block run leaves in ``OUT.partial`` (see ``rundir``,
which writes it): what a loader needs to tell a user that a checkpoint is not finished yet."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

PARTIAL_SUFFIX = ".partial"
STATE_DIR = ".llmcompress-run"
MANIFEST_FILE = "manifest.json"


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL_SUFFIX)


def unfinished_run(directory: Path) -> dict | None:
    """The manifest of the unfinished run in ``directory`` (an ``OUT.partial``), if there is one."""
    manifest = directory / STATE_DIR / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest} is corrupt ({err}): start the run again with --overwrite") from err


def describe_unfinished(manifest: dict) -> str:
    """'12 of 30 blocks committed; resume with: compress ... --resume'."""
    done, total = len(manifest["blocks"]), manifest["identity"].get("num_blocks", "?")
    command = manifest.get("command") or "the same compress command"
    return f"{done} of {total} blocks committed; resume with: {command} --resume"

"""A compression run committed block by block, so that a crash costs at most one block.

While the run goes on, its output lives in ``OUT.partial/``:

- ``model-block-00012.safetensors``: block 12's tensors exactly as the checkpoint holds them;
- ``.llmcompress-run/inputs-00013/``: the calibration activations entering the next block;
- ``.llmcompress-run/manifest.json``: what the run is (configuration, model files, calibration
  windows) and, per committed block, its shard and the shard's checksum, module entries and per-layer records. It is
  replaced (atomically) only once the block's shard and the next inputs are in place, so it is
  the commit point: whatever a kill leaves beyond it is ignored and rewritten on resume.

At the end the tensors outside the blocks, the index, the tokenizer, the report, the checksum
record and, last, config.json are written, the run state is removed and ``OUT.partial`` is renamed to ``OUT``.
Without config.json no directory loads as a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import CONFIG_FILE, REPORT_FILE, check_output_dir, write_config, write_index
from .errors import CheckpointError
from .fileio import replace_directory, staged_directory, staged_file
from .integrity import file_checksum
from .outdir import check_only_ours
from .runstate import MANIFEST_FILE, PARTIAL_SUFFIX, STATE_DIR, describe_unfinished, partial_path, unfinished_run

__all__ = ["MANIFEST_FILE", "OUTSIDE_SHARD", "PARTIAL_SUFFIX", "STATE_DIR", "RunDirectory", "check_start", "describe_unfinished",
           "partial_path", "unfinished_run"]

OUTSIDE_SHARD = "model-outside.safetensors"


def check_start(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run that would clobber something, or a resume with nothing to resume, before any
    expensive work."""
    out = check_output_dir(out, overwrite)
    partial = partial_path(out)
    existing = unfinished_run(partial) if partial.is_dir() else None
    if resume and existing is None:
        raise CheckpointError(f"nothing to resume: {partial} holds no unfinished run; run again without --resume")
    if not resume and partial.exists() and not overwrite:
        if existing is None and (partial / CONFIG_FILE).is_file():
            raise CheckpointError(f"{partial} holds a finished checkpoint that was not renamed: rename it to {out.name}, "
                                  "or pass --overwrite to start over")
        detail = describe_unfinished(existing) if existing else "it is not a run of ours"
        raise CheckpointError(f"{partial} holds an unfinished run ({detail}); or pass --overwrite to start over")
    if not resume and overwrite and partial.is_dir() and existing is None:
        check_only_ours(partial)  # without run state in it, only its names tell whether it is ours to remove


class RunDirectory:
    """The output of one run, written block by block into ``OUT.partial`` and published as ``OUT``."""

    def __init__(self, out: str | Path, identity: dict, resume: bool = False, overwrite: bool = False, command: str | None = None) -> None:
        check_start(out, resume, overwrite)
        self.out = Path(out).expanduser()
        self.partial = partial_path(self.out)
        self.state = self.partial / STATE_DIR
        identity = json.loads(json.dumps(identity, default=str))  # compared as it is stored
        if resume:
            self.manifest = unfinished_run(self.partial)
            self._check_same_run(self.manifest["identity"], identity)
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.state.mkdir(parents=True)
            self.manifest = {"identity": identity, "command": command, "blocks": []}
            self._write_manifest(self.manifest)

    def _check_same_run(self, stored: dict, wanted: dict) -> None:
        differences = sorted(key for key in stored.keys() | wanted.keys() if stored.get(key) != wanted.get(key))
        if differences:
            raise CheckpointError(f"cannot resume {self.partial}: it was started with a different {', '.join(differences)}; "
                                  "resume with the same model, options and calibration, or pass --overwrite to start over")

    @property
    def committed(self) -> int:
        """How many blocks (from block 0) are committed."""
        return len(self.manifest["blocks"])

    def committed_records(self) -> list[dict]:
        return [record for block in self.manifest["blocks"] for record in block["records"]]

    def _inputs_dir(self, index: int) -> Path:
        return self.state / f"inputs-{index:05d}"

    def resumed_inputs_dir(self) -> Path:
        """The directory of the activations entering the first uncommitted block."""
        directory = self._inputs_dir(self.committed)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is missing: the run state in {self.partial} is damaged; start again with --overwrite")
        return directory

    def commit_block(self, index: int, tensors: dict[str, Tensor], modules: dict[str, dict], records: list[dict],
                     next_inputs: Any) -> None:
        if index != self.committed:
            raise CheckpointError(f"block {index} committed out of order: {self.committed} blocks are committed")
        shard = f"model-block-{index:05d}.safetensors"
        with self._writing(f"block {index}"):
            with staged_file(self.partial / shard) as temporary:
                save_file(tensors, temporary, metadata={"format": "pt"})
                checksum = file_checksum(temporary)
            if next_inputs is not None:
                with staged_directory(self._inputs_dir(index + 1)) as staging:
                    next_inputs.save(staging)
            entry = {"index": index, "file": shard, "checksum": checksum, "tensors": sorted(tensors),
                     "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "modules": modules, "records": records}
            self._write_manifest({**self.manifest, "blocks": [*self.manifest["blocks"], entry]})
            self.manifest["blocks"].append(entry)
            shutil.rmtree(self._inputs_dir(index), ignore_errors=True)

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A failed write (a full disk) becomes an error that says what is kept and how to go on."""
        try:
            yield
        except OSError as err:
            raise CheckpointError(f"writing {what} into {self.partial} failed ({err}); {describe_unfinished(self.manifest)} "
                                  "once the cause is fixed") from err

    def _write_manifest(self, manifest: dict) -> None:
        with staged_file(self.state / MANIFEST_FILE) as temporary:
            temporary.write_text(json.dumps(manifest, indent=1))

    def finish(self, outside: dict[str, Tensor], hf_config: dict, tokenizer: Any, report: dict) -> Path:
        """Write what remains, config.json last, and publish ``OUT``."""
        with self._writing("the checkpoint's last files"):
            save_file(outside, self.partial / OUTSIDE_SHARD, metadata={"format": "pt"})
            weight_map = {name: block["file"] for block in self.manifest["blocks"] for name in block["tensors"]}
            weight_map.update(dict.fromkeys(sorted(outside), OUTSIDE_SHARD))
            total = sum(block["bytes"] for block in self.manifest["blocks"]) + sum(t.numel() * t.element_size() for t in outside.values())
            write_index(weight_map, total, self.partial)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.partial)
            (self.partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
            # Each block was hashed as it was committed: a shard damaged since then fails its check.
            # A run begun before manifests held checksums has its blocks hashed here instead.
            write_config(hf_config, self.partial, {block["file"]: block["checksum"] for block in self.manifest["blocks"] if "checksum" in block})
        # From here a kill leaves a complete checkpoint under OUT.partial, which check_start names.
        shutil.rmtree(self.state)
        try:
            replace_directory(self.partial, self.out)
        except OSError as err:
            # Not resumable any more (its state is gone), and complete: left in place it would pass for a result.
            shutil.rmtree(self.partial, ignore_errors=True)
            raise CheckpointError(f"the finished checkpoint could not be renamed from {self.partial} to {self.out} ({err.strerror or err}): "
                                  "choose an --out that a directory can be renamed to") from err
        return self.out

    def abandon(self) -> str:
        """After a failure: remove ``OUT.partial`` if no block is committed (nothing there is worth
        resuming); otherwise keep it and say how to resume, unless ``finish`` had to remove it."""
        if self.committed == 0:
            shutil.rmtree(self.partial, ignore_errors=True)
            return "nothing was written"
        if not self.partial.exists():
            return "nothing was kept"
        return f"{describe_unfinished(self.manifest)} (in {self.partial})"

    def modules(self) -> dict[str, dict]:
        return {name: entry for block in self.manifest["blocks"] for name, entry in block["modules"].items()}

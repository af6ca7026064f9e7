"""Run a grid: each configuration is a real `compress` run, then a real `compress eval` run.

Each runs in its own process, so that its peak memory is its own (``os.wait4``) and its numbers
are exactly those a user gets typing the same command. A finished configuration leaves
``runs/NAME/result.json`` (written last, atomically); a rerun keeps every configuration whose
record matches its options and protocol, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import CONFIG_FILE, REPORT_FILE
from ..fileio import staged_file
from ..models import resolve_model_dir
from .document import environment
from .grid import Configuration, Grid

RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
LOG_TAIL_LINES = 15


def command_line(grid: Grid, configuration: Configuration, checkpoint: Path) -> list[str]:
    """The `compress` command that produces one configuration's checkpoint (no evaluation: that is a separate run)."""
    model = [grid.model] if grid.model else []
    return ["compress", *model, *configuration.args, *grid.protocol.compress_options(), "--device", grid.device,
            "--no-eval", "--out", str(checkpoint), "--overwrite"]


def eval_command_line(grid: Grid, target: str | None, json_path: Path) -> list[str]:
    return ["compress", "eval", *([target] if target else []), *grid.protocol.eval_options(), "--device", grid.device,
            "--json", str(json_path)]


def run_grid(grid: Grid, out: Path, checkpoints: Path, keep_checkpoints: bool, echo: Callable[[str], None] = print) -> list[dict]:
    """Run every configuration not already finished; return one record per configuration, in grid order."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for configuration in grid.configurations:
        earlier = _read_record(runs / configuration.name / RESULT_FILE)
        if earlier is not None and earlier.get("spec") == _spec(grid, configuration) and earlier.get("status") == "ok":
            records[configuration.name] = earlier
    if records:
        echo(f"{len(records)} of {len(grid.configurations)} configurations finished earlier; they are kept")
    total = len(grid.configurations)
    for number, configuration in enumerate(grid.configurations, start=1):
        if configuration.name in records:
            continue
        echo(f"[{number}/{total}] {configuration.name}: {'the float model' if configuration.is_float else shlex.join(configuration.args)}"
             f"{_estimate(records, total)}")
        run_dir = runs / configuration.name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a configuration that did not finish, or whose options changed
        run_dir.mkdir(parents=True)
        record = _run_configuration(grid, configuration, run_dir, checkpoints / configuration.name, keep_checkpoints)
        with staged_file(run_dir / RESULT_FILE) as staging:
            staging.write_text(json.dumps(record, indent=2))
        records[configuration.name] = record
        if record["status"] == "ok":
            perplexity = record["perplexity"]["perplexity"]
            echo(f"    perplexity {perplexity:.3f}, {record['seconds']:.0f} s")
        else:
            echo(f"    FAILED ({record['error']}); log: {run_dir / LOG_FILE}")
    return [records[c.name] for c in grid.configurations]


def _estimate(records: dict[str, dict], total: int) -> str:
    """How long the rest should take: the configurations left times the mean of those measured."""
    measured = [r["seconds"] for r in records.values() if r.get("status") == "ok"]
    left = total - len(records)
    if not measured:
        return f" ({left} to run)"
    seconds = left * sum(measured) / len(measured)
    return f" ({left} to run, about {seconds:.0f} s at the mean so far)" if seconds < 90 else \
        f" ({left} to run, about {seconds / 60:.0f} min at the mean so far)"


def _spec(grid: Grid, configuration: Configuration) -> dict:
    """What makes a finished configuration reusable: its options, the protocol, the model and device."""
    return {"model": grid.model, "device": grid.device, "protocol": grid.protocol.to_dict(), **configuration.to_dict()}


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or half-written: the configuration runs again


def _run_configuration(grid: Grid, configuration: Configuration, run_dir: Path, checkpoint: Path, keep_checkpoint: bool) -> dict:
    record: dict = {"name": configuration.name, "spec": _spec(grid, configuration), "status": "failed", "environment": environment()}
    log = run_dir / LOG_FILE
    eval_json = run_dir / "perplexity.json"
    if configuration.is_float:
        compressed = None
        target = grid.model
    else:
        compressed = _run_process(command_line(grid, configuration, checkpoint), log)
        record["compress"] = compressed
        if compressed["returncode"] != 0:
            return {**record, "error": f"compress exited with {compressed['returncode']}", "log_tail": _tail(log)}
        target = str(checkpoint)
    evaluated = _run_process(eval_command_line(grid, target, eval_json), log)
    record["evaluate"] = evaluated
    if evaluated["returncode"] != 0:
        return {**record, "error": f"compress eval exited with {evaluated['returncode']}", "log_tail": _tail(log)}
    record["perplexity"] = json.loads(eval_json.read_text())["perplexity"]
    record["seconds"] = evaluated["seconds"] + (compressed["seconds"] if compressed else 0.0)
    if compressed is None:
        record.update(config=None, weights_on_disk_bytes=_model_weight_bytes(grid.model))
    else:
        report = json.loads((checkpoint / REPORT_FILE).read_text())
        hf_config = json.loads((checkpoint / CONFIG_FILE).read_text())
        record.update(config=hf_config["quantization_config"]["recipe"], size=report["size_after"], size_float=report["size_before"],
                      compression_seconds=report["seconds"], weights_on_disk_bytes=_safetensors_bytes(checkpoint),
                      activations=report.get("activations"))
        # The per-layer statistics, kept with the record so the report needs neither the checkpoint nor a second pass.
        shutil.copy(checkpoint / REPORT_FILE, run_dir / REPORT_FILE)
        record["checkpoint"] = str(checkpoint) if keep_checkpoint else None
        if not keep_checkpoint:
            shutil.rmtree(checkpoint)
    record["status"] = "ok"
    return record


def _run_process(argv: list[str], log: Path) -> dict:
    """Run a `compress` command line as ``python -m llmcompress``; its output goes to ``log``."""
    with log.open("a") as stream:
        stream.write(f"$ {shlex.join(argv)}\n")
        stream.flush()
        started = time.perf_counter()
        # Progress bars would fill the log with redraws; one line a minute is enough there.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "60"}
        process = subprocess.Popen([sys.executable, "-m", "llmcompress", *argv[1:]], stdout=stream, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except KeyboardInterrupt:
            process.wait()  # the child got the same Ctrl-C; let it leave its state tidy
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
    # Linux reports ru_maxrss in KiB.
    return {"command": shlex.join(argv), "returncode": process.returncode, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def _safetensors_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _model_weight_bytes(model: str | None) -> int | None:
    directory = Path(resolve_model_dir(model))
    return _safetensors_bytes(directory) if directory.is_dir() else None

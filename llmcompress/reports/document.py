"""The report's numbers (report.json) and their reading (report.md), from the grid's run records."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..version import __version__
from ..config import CompressConfig
from ..flags import recipe_from_config
from ..recipe import Recipe
from .grid import Grid

# The layer types of the heatmap, in a block's order; others (OPT's fc1/fc2 ...) follow by name.
LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_AND_TYPE = re.compile(r"\.(\d+)\.(?:.+\.)?([^.]+)$")
MB = 1e6


@dataclass(frozen=True)
class Row:
    """One configuration's numbers as the report shows them."""

    name: str
    record: dict

    @property
    def ok(self) -> bool:
        return self.record.get("status") == "ok"

    @property
    def config(self) -> Recipe | None:
        """The recipe the run used (records written before recipes hold the flag-shaped config)."""
        data = self.record.get("config")
        if data is None:
            return None
        return Recipe.from_dict(data) if "passes" in data else recipe_from_config(CompressConfig.from_dict(data))

    @property
    def perplexity(self) -> float:
        return self.record["perplexity"]["perplexity"]

    def labels(self) -> dict:
        """Method, weight format, branch and pruning, in words."""
        config = self.config
        if config is None:
            return {"method": "float", "weights": "unquantized", "branch": "", "pruning": "", "rank": 0, "lowrank_method": None}
        return config.report_labels()

    def bits(self, float_size: dict | None) -> dict:
        """Bits per weight of the compressed layers (base codes, low-rank branch, metadata) and of the
        whole model. The float model's row uses ``float_size``, the float sizes a compress run measured."""
        size = self.record.get("size", float_size)
        if size is None:  # a float model with no compressed run beside it: assume 16-bit weights
            return {"layers": 16.0, "base": 16.0, "lowrank": 0.0, "metadata": 0.0, "whole_model": 16.0}
        return {"layers": size["layer_bits_per_weight"], "base": size["base_bits_per_weight"], "lowrank": size["branch_bits_per_weight"],
                "metadata": size["metadata_bits_per_weight"], "whole_model": size["bits_per_weight"]}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (bits, perplexity) that no other point beats on both, by increasing bits."""
    front, best = [], math.inf
    for name, (_, perplexity) in sorted(points.items(), key=lambda item: (item[1][0], item[1][1])):
        if perplexity < best:
            front.append(name)
            best = perplexity
    return front


def layer_errors(compression_report: dict) -> dict:
    """Relative output error per block x layer type, from a run's compression_report.json."""
    cells: dict[tuple[int, str], float] = {}
    for layer in compression_report["layers"]:
        match = BLOCK_AND_TYPE.search(layer["name"])
        if match and layer.get("output_error") is not None:
            cells[(int(match[1]), match[2])] = layer["output_error"]
    found = {kind for _, kind in cells}
    types = [t for t in LAYER_ORDER if t in found] + sorted(found - set(LAYER_ORDER))
    blocks = compression_report["num_blocks"]
    matrix = [[cells.get((block, kind)) for block in range(blocks)] for kind in types]
    return {"layer_types": types, "blocks": blocks, "output_error": matrix}


def build_report(grid: Grid, records: list[dict], runs_dir: Path, command: str) -> dict:
    rows = [Row(r["name"], r) for r in records]
    float_row = next((r for r in rows if r.ok and r.config is None), None)
    float_ppl = float_row.perplexity if float_row else None
    float_size = next((r.record["size_float"] for r in rows if r.ok and "size_float" in r.record), None)
    entries = []
    for row in rows:
        entry = {"name": row.name, "args": row.record["spec"]["args"], "status": row.record.get("status"), **row.labels()}
        if not row.ok:
            entries.append({**entry, "error": row.record.get("error"), "log_tail": row.record.get("log_tail")})
            continue
        entry.update(perplexity=row.perplexity, bits_per_weight=row.bits(float_size), weights_on_disk_bytes=row.record.get("weights_on_disk_bytes"),
                     compression_seconds=row.record.get("compression_seconds"),
                     compress_process_seconds=row.record.get("compress", {}).get("seconds"),
                     compress_peak_rss_mb=row.record.get("compress", {}).get("peak_rss_mb"),
                     eval_seconds=row.record["evaluate"]["seconds"], eval_peak_rss_mb=row.record["evaluate"]["peak_rss_mb"])
        if float_ppl is not None:
            entry.update(delta=row.perplexity - float_ppl, relative_delta=row.perplexity / float_ppl - 1)
        entries.append(entry)
    finished = [e for e in entries if e["status"] == "ok"]
    points = {e["name"]: (e["bits_per_weight"]["layers"], e["perplexity"]) for e in finished}
    heatmaps = {}
    for name in grid.heatmaps:
        report_file = runs_dir / name / "compression_report.json"
        if report_file.is_file():
            heatmaps[name] = layer_errors(json.loads(report_file.read_text()))
    scored = next((r.record["perplexity"] for r in rows if r.ok), None)
    return {
        "command": command,
        "model": grid.model or "default (SmolLM2-135M-Instruct, bundled)",
        "device": grid.device,
        "protocol": {**grid.protocol.to_dict(), "perplexity": scored["protocol"] if scored else None,
                     "tokens_scored": scored["tokens_scored"] if scored else None},
        "environment": environment(),
        # A grid resumed across commits mixes them: each row's record says which one ran it.
        "run_commits": sorted({r.record["environment"]["commit"] or "unknown" for r in rows if "environment" in r.record}),
        "float_perplexity": float_ppl,
        "rows": entries,
        "pareto_front": pareto_front(points),
        "heatmaps": heatmaps,
    }


def environment() -> dict:
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None  # an installed package outside a git checkout
    return {"llmcompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "commit": commit, "machine": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or "unknown"


def markdown(report: dict, plots: dict[str, str]) -> str:
    """report.md: the table, the Pareto front, the plots and the protocol."""
    float_ppl = report["float_perplexity"]
    lines = [f"# Compression report: {report['model']}", "",
             f"Made by `{report['command']}`. Every row is a separate `compress` run and a separate `compress eval` run "
             "of what it wrote (the commands are in report.json).", "",
             "| configuration | method | weights | low-rank | pruning | perplexity | vs float | bits/weight | base | low-rank | metadata "
             "| weights on disk (MB) | compression (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {row['method']} | {row['weights']} | {row['branch']} | {row['pruning']} | failed | | | | | | | | |")
            continue
        bits = row["bits_per_weight"]
        delta = f"{row['delta']:+.3f} ({row['relative_delta']:+.1%})" if "delta" in row and row["method"] != "float" else ""
        disk = f"{row['weights_on_disk_bytes'] / MB:,.1f}" if row["weights_on_disk_bytes"] else ""
        seconds = f"{row['compression_seconds']:.1f}" if row["compression_seconds"] is not None else ""
        rss = f"{row['compress_peak_rss_mb']:,.0f}" if row["compress_peak_rss_mb"] is not None else f"{row['eval_peak_rss_mb']:,.0f} (eval)"
        front = " *" if row["name"] in report["pareto_front"] else ""
        lines.append(f"| {row['name']}{front} | {row['method']} | {row['weights']} | {row['branch']} | {row['pruning']} | "
                     f"{row['perplexity']:.3f} | {delta} | {bits['layers']:.3f} | {bits['base']:.3f} | {bits['lowrank']:.3f} | "
                     f"{bits['metadata']:.3f} | {disk} | {seconds} | {rss} |")
    lines += ["", "\\* on the Pareto front: no other configuration has both fewer bits per weight and a lower perplexity.", ""]
    if float_ppl is not None:
        lines += [f"Float model perplexity: {float_ppl:.3f}.", ""]
    for title, key in (("Perplexity against bits per weight", "pareto"), ("Perplexity against the rank of the low-rank branch", "rank"),
                       ("Where the error lives: relative output error per layer", "layers")):
        if key in plots:
            lines += [f"## {title}", "", f"![{title}]({plots[key]})", ""]
    failed = [row for row in report["rows"] if row["status"] != "ok"]
    if failed:
        lines += ["## Failed configurations", ""]
        for row in failed:
            lines += [f"- **{row['name']}** (`{row['args']}`): {row['error']}", "", "```", row.get("log_tail") or "", "```", ""]
    lines += _protocol_lines(report)
    return "\n".join(lines) + "\n"


def _protocol_lines(report: dict) -> list[str]:
    protocol, env = report["protocol"], report["environment"]
    calibration = protocol["calibration"]
    gpu = f", GPU {env['gpu']}" if env["gpu"] else ""
    return [
        "## Protocol", "",
        f"- Model: {report['model']}; compression and evaluation on `{report['device']}`.",
        f"- Perplexity: {protocol['perplexity']}.",
        f"- Calibration: {calibration['source']}, {calibration['nsamples']} windows of {calibration['seqlen']} tokens, seed "
        f"{calibration['seed']}. Every configuration is calibrated, data-free ones (RTN, magnitude) included, so that each "
        "layer's output error is measured; their compression time includes that pass.",
        "- Bits per weight: stored bits of the compressed layers' weights divided by their weight count: the codes (base), the "
        "16-bit low-rank branch and smoothing vectors (low-rank), and scales, zero points, g_idx and sparsity masks (metadata). "
        "Embeddings and norms stay 16-bit and are not counted; report.json has the whole model's figure too.",
        "- Compression time: the pipeline's own (loading and writing excluded). Peak RSS: the compress process's "
        "(`os.wait4`), or the evaluation's for the float model.",
        f"- Versions (of the process that wrote this report): llmcompress {env['llmcompress']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}; commit {env['commit'] or 'unknown'}. "
        f"Commits that ran the configurations: {', '.join(report['run_commits']) or 'not recorded (runs older than this field)'}.",
        f"- Machine: {env['cpu']}, {env['cpu_count']} CPUs ({env['torch_threads']} torch threads){gpu}; {env['machine']}.",
    ]

"""Calibration across processes (``llmcompress.distributed``): two processes under torchrun, on
gloo, write the bytes one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_moe import moe_model

from llmcompress.distributed import _units
from llmcompress.outdir import REPORT_FILE
from llmcompress.passes import LayerState, Target
from llmcompress.stats import ALL_STATISTICS, SAMPLES, LayerStats

# One thread per process, as torchrun gives each: CPU matmuls may round differently at other thread counts.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# What differs between any two runs, even of one process: the report's timings.
TIMED = ("seconds",)


def launch(model: Path, out: Path, processes: int, *options: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "llmcompress", str(model), *options, "--no-eval", "--out", str(out)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def compress(model: Path, out: Path, processes: int, *options: str) -> None:
    done = launch(model, out, processes, *options)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMED}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def assert_same_checkpoint(one: Path, two: Path) -> None:
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for name in files:
        if name.name == REPORT_FILE:
            assert without_timings(json.loads((one / name).read_text())) == without_timings(json.loads((two / name).read_text()))
        else:
            assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} differs"


GPTQ = ("--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", "austen:train", "--nsamples", "6", "--seqlen", "32",
        "--batch-size", "1")


def test_two_processes_write_the_bytes_of_one(tiny_model_dir, tmp_path):
    compress(tiny_model_dir, tmp_path / "one", 1, *GPTQ)
    compress(tiny_model_dir, tmp_path / "two", 2, *GPTQ)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    report = json.loads((tmp_path / "two" / REPORT_FILE).read_text())
    assert report["calibration_tokens"] == 6 * 32 and all(layer["tokens"] == 6 * 32 for layer in report["layers"])


def test_two_processes_smooth_and_write_a_serving_export_as_one(tiny_model_dir, tmp_path):
    """AWQ (statistics and scales folded on the float block) over an uneven split (5 micro-batches),
    with the model loaded whole (a serving format is written at the end)."""
    options = ("--method", "awq", "--bits", "4", "--group-size", "32", "--calib", "austen:train", "--nsamples", "5", "--seqlen", "32",
               "--batch-size", "1", "--export", "compressed-tensors")
    compress(tiny_model_dir, tmp_path / "one", 1, *options)
    compress(tiny_model_dir, tmp_path / "two", 2, *options)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_two_processes_count_each_experts_tokens_as_one(tmp_path, tokenizer):
    """Experts reached by some micro-batches only, on one process or the other: their statistics,
    token counts and the starved ones' data-free fallback are as one process finds them."""
    model = tmp_path / "mixtral"
    moe_model("mixtral").save_pretrained(model)
    tokenizer.save_pretrained(model)
    options = (*GPTQ, "--set", "calibration.expert_min_tokens=40")
    compress(model, tmp_path / "one", 1, *options)
    compress(model, tmp_path / "two", 2, *options)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    layers = json.loads((tmp_path / "two" / REPORT_FILE).read_text())["layers"]
    experts = [layer for layer in layers if ".experts." in layer["name"]]
    assert experts and any(layer["fallback"] for layer in experts) and any(not layer["fallback"] for layer in experts)


def test_fewer_micro_batches_than_processes_is_refused_in_one_line(tiny_model_dir, tmp_path):
    done = launch(tiny_model_dir, tmp_path / "out", 2, *GPTQ[:8], "--nsamples", "1", "--seqlen", "32", "--batch-size", "1")
    assert done.returncode != 0
    assert "Error: 1 calibration micro-batches cannot be shared by 2 processes: raise --nsamples" in done.stderr
    assert not (tmp_path / "out").exists()


def test_adding_contributions_one_by_one_is_update():
    torch.manual_seed(0)
    batches = [torch.randn(2, 40, 16) for _ in range(4)]
    weights = [torch.rand(80) for _ in range(4)]
    updated, replayed = LayerStats(16, ALL_STATISTICS | {SAMPLES}), LayerStats(16, ALL_STATISTICS | {SAMPLES})
    parts = [replayed.contribution(x, w) for x, w in zip(batches, weights, strict=True)]
    for x, w in zip(batches, weights, strict=True):
        updated.update(x, w)
    for part in parts:
        replayed.add(part)
    assert updated.tokens == replayed.tokens == 320
    for name in ("xtx", "abs_sum", "abs_max"):
        assert torch.equal(getattr(updated, name), getattr(replayed, name))
    assert torch.equal(updated.samples, replayed.samples)


def test_work_units_are_the_layers_that_share_one_hessian():
    def state(name: str, hessian: torch.Tensor | None) -> LayerState:
        weight = torch.zeros(2, 2)
        return LayerState(target=Target(name, 0, name), original=weight, weight=weight, target_weight=weight, hessian=hessian)

    qkv, o = torch.eye(2), torch.eye(2)
    states = [state("q", qkv), state("k", qkv), state("v", qkv), state("o", o), state("x", None), state("y", None)]
    assert [[s.target.name for s in unit] for unit in _units(states)] == [["q", "k", "v"], ["o"], ["x"], ["y"]]

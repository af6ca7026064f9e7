"""Compressing a model on disk block by block: memory of one block, resumable after SIGKILL or
Ctrl-C, deterministic, and never a half-written checkpoint that looks finished."""

import errno
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIVE_BLOCKS as BLOCKS
from conftest import tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

import llmcompress
from llmcompress import CalibConfig, CheckpointError, CompressConfig, ModelError, QuantFormat, rundir
from llmcompress.api import compress_to_disk
from llmcompress.cli import main
from llmcompress.pipeline.sharded import meta_model as sharded_meta_model

CONFIG = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", calib=CalibConfig(nsamples=4, seqlen=64))


def _files(directory: Path) -> dict[str, bytes]:
    """Every file's bytes; the report without its timings (wall-clock seconds differ between runs)
    and without where the activations were kept (which the runs compared here vary on purpose)."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    report = json.loads(files.pop(rundir.REPORT_FILE))
    report.pop("seconds")
    report.pop("activations")
    for layer in report["layers"]:
        layer.pop("seconds")
    files[rundir.REPORT_FILE] = json.dumps(report, sort_keys=True).encode()
    return files


def test_streamed_run_equals_the_in_memory_one(five_block_dir, tmp_path):
    out, report = compress_to_disk(five_block_dir, CONFIG, tmp_path / "streamed", calibration="austen:train", progress=False)
    assert len(report.layers) == 7 * BLOCKS
    streamed, _ = llmcompress.load(out)
    in_memory = llmcompress.compress(str(five_block_dir), CONFIG, calibration="austen:train", progress=False)
    tokens = torch.arange(40).reshape(2, 20)
    assert torch.equal(streamed(tokens).logits, in_memory(tokens).logits)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"model-block-{i:05d}.safetensors" for i in range(BLOCKS)), "model-outside.safetensors", "model.safetensors.index.json",
         "llmcompress-checksums.json", "config.json", "llmcompress_auto.py", "recipe.yaml", "compression_report.json", "tokenizer.json", "tokenizer_config.json"])


KILLER = r'''
import os, signal, sys
from llmcompress import CalibConfig, CompressConfig, QuantFormat, rundir
from llmcompress.api import compress_to_disk

model, out, where = sys.argv[1:4]
original = rundir.RunDirectory._write_manifest

def write_manifest(self, manifest):
    if where == "inside-commit" and len(manifest["blocks"]) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # block 2's shard and inputs are written, its manifest entry is not
    original(self, manifest)
    if where == "after-commit" and len(manifest["blocks"]) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

rundir.RunDirectory._write_manifest = write_manifest
config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", calib=CalibConfig(nsamples=4, seqlen=64))
compress_to_disk(model, config, out, calibration="austen:train", progress=False, command="compress MODEL --out OUT")
'''


@pytest.mark.parametrize("where", ["after-commit", "inside-commit"])
def test_sigkill_then_resume_gives_a_byte_identical_checkpoint(five_block_dir, tmp_path, where):
    reference, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "reference", calibration="austen:train", progress=False)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(five_block_dir), str(out), where], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"unfinished in .*\(2 of 5 blocks committed; resume with: compress MODEL --out OUT --resume\)"):
        llmcompress.load(out)
    with pytest.raises(CheckpointError, match="unfinished run, not a checkpoint"):
        llmcompress.load(rundir.partial_path(out))
    with pytest.raises(CheckpointError, match="holds an unfinished run .* --overwrite to start over"):
        compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False)
    resumed, report = compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False, resume=True)
    assert len(report.layers) == 7 * BLOCKS  # the committed blocks' records come from the manifest
    assert _files(resumed) == _files(reference)
    assert not rundir.partial_path(out).exists()


def test_same_inputs_give_byte_identical_checkpoints(five_block_dir, tmp_path):
    first, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "a", calibration="austen:train", progress=False)
    second, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "b", calibration="austen:train", progress=False)
    assert _files(first) == _files(second)


def _interrupt_after(monkeypatch, blocks: int, error: BaseException) -> None:
    original = rundir.RunDirectory.commit_block

    def commit_block(self, index, *args):
        if index == blocks:
            raise error
        original(self, index, *args)

    monkeypatch.setattr(rundir.RunDirectory, "commit_block", commit_block)


def test_ctrl_c_leaves_a_resumable_run_and_says_so(five_block_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [str(five_block_dir), "--out", str(out), "--bits", "4", "--group-size", "32", "--method", "gptq", "--nsamples", "4",
            "--seqlen", "64", "--no-eval"]
    _interrupt_after(monkeypatch, 3, KeyboardInterrupt())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert f"interrupted; 3 of 5 blocks committed; resume with: compress {shlex.join(args)} --resume" in result.output
    monkeypatch.undo()
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming each block" in result.output and f"wrote: {out}" in result.output
    assert llmcompress.load(out)[0].model.layers[4].mlp.down_proj.fmt.bits == 4


def test_full_disk_keeps_the_committed_blocks_and_resumes(five_block_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError):
        compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False)
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"writing block 2 into .* failed .*No space left on device.*2 of 5 blocks committed; resume"):
        compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False, resume=True)
    assert not out.exists() and not list(rundir.partial_path(out).glob("*00002*"))
    monkeypatch.undo()
    compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False, resume=True)
    assert llmcompress.load(out)[0] is not None


def test_resume_refuses_a_different_run(five_block_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        compress_to_disk(five_block_dir, CONFIG, out, calibration="austen:train", progress=False)
    other = CompressConfig(quant=QuantFormat(bits=3, group_size=32), method="gptq", calib=CONFIG.calib)
    with pytest.raises(CheckpointError, match="started with a different config; resume with the same"):
        compress_to_disk(five_block_dir, other, out, calibration="austen:train", progress=False, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        compress_to_disk(five_block_dir, CONFIG, tmp_path / "never-started", calibration="austen:train", progress=False, resume=True)


def test_bad_model_directories_are_explained(five_block_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        compress_to_disk(tmp_path / "missing", CONFIG, tmp_path / "o")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        compress_to_disk(tmp_path / "no-config", CONFIG, tmp_path / "o")
    shard = five_block_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelError, match="model.safetensors: .*truncated or corrupt: re-download or re-save"):
        compress_to_disk(five_block_dir, CONFIG, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not rundir.partial_path(tmp_path / "o").exists()


def test_nan_weight_deep_in_the_model_is_named(tmp_path, tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(ModelError, match=r"model.layers.2.mlp.up_proj.weight contains NaN or Inf: repair.*"
                                         r"\(2 of 3 blocks committed; resume with: .* --resume \(in .*o.partial\)\)"):
        compress_to_disk(tmp_path / "model", CONFIG, tmp_path / "o", calibration="austen:train", progress=False)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = 0.0
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ModelError, match=r"model.layers.0.mlp.up_proj.weight contains NaN.*\(nothing was written\)"):
        compress_to_disk(tmp_path / "model", CONFIG, tmp_path / "o", calibration="austen:train", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no o.partial that looks like a result


def test_unmappable_architecture_says_what_it_looked_for(tmp_path):
    """GPT-2's Conv1D layers are read as Linears (test_moe.py); a layer type nobody knows is named."""

    class FancyLinear(torch.nn.Module):
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(nx, nf))

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    model = AutoModelForCausalLM.from_config(config)
    for block in model.transformer.h:
        block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj = (FancyLinear(1, 1) for _ in range(4))
    with pytest.raises(ModelError, match=r"looked for a torch.nn.ModuleList .* projection layers are FancyLinear"):
        llmcompress.compress(model, CompressConfig(quant=QuantFormat(bits=4, group_size=16)), progress=False)


def test_one_block_holds_tensors_at_a_time(five_block_dir, tmp_path, monkeypatch):
    """When block i is read, every other block is on the meta device (no memory)."""
    from llmcompress import api, streaming

    models = []
    monkeypatch.setattr(api, "meta_model", lambda directory: models.append(sharded_meta_model(directory)) or models[-1])
    resident_at_load = []
    original_load = streaming.DiskStream.load

    def load(self, index, block, device):
        resident_at_load.append([i for i, b in enumerate(models[0].model.layers) if not next(b.parameters()).is_meta])
        original_load(self, index, block, device)

    monkeypatch.setattr(streaming.DiskStream, "load", load)
    compress_to_disk(five_block_dir, CONFIG, tmp_path / "o", calibration="austen:train", progress=False)
    assert resident_at_load == [[]] * BLOCKS
    assert all(next(b.parameters()).is_meta for b in models[0].model.layers)


def test_rank_and_group_too_large_are_refused_before_anything_is_written(five_block_dir, tmp_path):
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), lowrank=llmcompress.LowRankConfig(rank=100), calib=CalibConfig(source="none"))
    with pytest.raises(llmcompress.ConfigError, match="rank 100 is larger than"):
        compress_to_disk(five_block_dir, config, tmp_path / "o")
    with pytest.raises(llmcompress.ConfigError, match="group_size=128 is larger than"):
        compress_to_disk(five_block_dir, CompressConfig(quant=QuantFormat(bits=4)), tmp_path / "o")
    assert list(tmp_path.iterdir()) == [five_block_dir]


@pytest.mark.parametrize("place", ["host", "disk"])
def test_activations_on_the_host_or_on_disk_change_no_bit(five_block_dir, tmp_path, monkeypatch, place):
    reference, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "reference", calibration="austen:train", progress=False)
    spill = tmp_path / "spill"
    _interrupt_after(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        compress_to_disk(five_block_dir, CONFIG, tmp_path / "out", calibration="austen:train", progress=False,
                         activations=place, offload_dir=spill)
    monkeypatch.undo()
    out, report = compress_to_disk(five_block_dir, CONFIG, tmp_path / "out", calibration="austen:train", progress=False, resume=True,
                                   activations=place, offload_dir=spill)
    assert report.activations == place
    assert _files(out) == _files(reference)
    import gc

    gc.collect()
    assert not list(spill.rglob("*.safetensors")) if place == "disk" else not spill.exists()


def test_activations_spill_to_disk_only_when_they_do_not_fit(tmp_path, monkeypatch):
    from llmcompress.pipeline import activations

    cpu = torch.device("cpu")
    assert activations.choose_place("auto", 1 << 20, cpu, tmp_path) == "device"
    monkeypatch.setattr(activations, "_available_host_bytes", lambda: 1 << 20)
    assert activations.choose_place("auto", 1 << 20, cpu, tmp_path) == "disk"
    assert activations.choose_place("auto", 1 << 20, cpu, None) == "device"  # nowhere better: try in memory
    assert activations.choose_place("host", 1 << 20, cpu, None) == "host"
    with pytest.raises(llmcompress.ConfigError, match="need an offload directory: pass --offload-dir"):
        activations.Activations(cpu, "disk", None)


def test_command_line_offloads_activations_and_loads_back(five_block_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(five_block_dir), "--out", str(out), "--bits", "4", "--group-size", "32", "--method", "gptq",
                                       "--nsamples", "4", "--seqlen", "64", "--activations", "disk", "--offload-dir", str(tmp_path / "spill"),
                                       "--eval-seqlen", "64", "--eval-windows", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression_report.json").read_text())
    assert report["activations"] == "disk" and report["perplexity_after"]["windows"] == 2
    assert report["size_after"]["layer_bits_per_weight"] < 5
    result = CliRunner().invoke(main, [str(five_block_dir), "--out", str(out), "--group-size", "32"])
    assert result.exit_code == 1 and "already exists" in result.output
    result = CliRunner().invoke(main, [str(five_block_dir), "--out", str(tmp_path / "other"), "--activations", "disk"])
    assert result.exit_code == 1 and "--activations disk needs a directory for them: add --offload-dir DIR" in result.output


def test_a_finished_but_unrenamed_run_is_named(tmp_path):
    partial = rundir.partial_path(tmp_path / "out")
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds a finished checkpoint that was not renamed: rename it to out"):
        rundir.check_start(tmp_path / "out", resume=False, overwrite=False)


def test_a_head_the_shards_lack_fails_before_any_block(tmp_path):
    """A checkpoint without its untied head stops before the first block, naming what is there,
    and leaves nothing behind. (GPT-NeoX's head, saved as embed_out.weight and named lm_head in
    memory, is found under its stored name: test_moe.py runs it.)"""
    from safetensors.torch import load_file, save_file
    from transformers import GPTNeoXConfig

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "neox")
    tensors = load_file(tmp_path / "neox" / "model.safetensors")
    tensors["unexpected.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, tmp_path / "neox" / "model.safetensors", metadata={"format": "pt"})
    windows = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match=r"lacks lm_head.weight \(tensors there that the model does not name: unexpected.weight\)"):
        compress_to_disk(tmp_path / "neox", CompressConfig(quant=QuantFormat(bits=4, group_size=32)), tmp_path / "o",
                         calibration=windows, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]

"""Checkpoints record the checksum of every file; a load, and `compress verify`, name a damaged one."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress import checkpoint, integrity, rundir
from llmcompress.api import compress_to_disk
from llmcompress.cli import main
from llmcompress.config import CompressConfig, LowRankConfig, QuantFormat
from llmcompress.errors import CheckpointError
from llmcompress.export import ADAPTER_DIR, export

IDS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
PACKED = "model.layers.1.mlp.up_proj.weight_packed"
W4 = QuantFormat(bits=4, group_size=32)


def _compressed(rank=0):
    lowrank = LowRankConfig(rank=rank, method="lorc") if rank else LowRankConfig()
    return llmcompress.compress(tiny_model("llama"), CompressConfig(quant=W4, lowrank=lowrank), calibration="none", progress=False)


def _saved(path, tokenizer, **kwargs):
    model = _compressed()
    checkpoint.save(model, path, model.llmcompress_config, tokenizer=tokenizer, **kwargs)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _shard_of(directory, tensor):
    index = directory / "model.safetensors.index.json"
    return directory / (json.loads(index.read_text())["weight_map"][tensor] if index.is_file() else "model.safetensors")


def _flip_byte(file, tensor):
    """XOR one byte in the middle of ``tensor``'s data: the file still parses, the weights are wrong."""
    data = bytearray(file.read_bytes())
    (header_bytes,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8: 8 + header_bytes])[tensor]["data_offsets"]
    data[8 + header_bytes + (start + end) // 2] ^= 0x5A
    file.write_bytes(bytes(data))


def _verify(directory):
    return CliRunner().invoke(main, ["verify", str(directory)])


def test_the_record_covers_every_file_but_config_and_report(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    _saved(out, tokenizer, max_shard_bytes=40_000)
    recorded = integrity.read_record(out)
    on_disk = {p.name for p in out.iterdir()} - {checkpoint.CONFIG_FILE, checkpoint.REPORT_FILE, integrity.CHECKSUM_FILE}
    assert set(recorded) == on_disk and len([n for n in recorded if n.endswith(".safetensors")]) > 2
    assert all(recorded[name] == integrity.file_checksum(out / name) for name in recorded)
    checkpoint.add_to_report(out, {"perplexity_after": 1.0})  # measurements merged in later do not break the record
    result = _verify(out)
    assert result.exit_code == 0, result.output
    assert f"all {len(recorded)} files" in result.output and "match their checksums" in result.output


def test_a_flipped_byte_is_named_on_load_and_by_verify_and_verify_false_skips_the_check(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    model = _saved(out, tokenizer, max_shard_bytes=40_000)
    damaged = _shard_of(out, PACKED)
    _flip_byte(damaged, PACKED)
    with pytest.raises(CheckpointError) as caught:
        llmcompress.load(out)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{damaged} is corrupt") and "re-download" in message
    result = _verify(out)
    assert result.exit_code == 1
    assert f"{damaged} is corrupt" in result.output and "1 of " in result.output
    assert sum(line.startswith("ok  ") for line in result.output.splitlines()) == len(integrity.read_record(out)) - 1
    loaded, _ = llmcompress.load(out, verify=False)  # what every load did before checksums: no word, wrong weights
    assert not torch.equal(_logits(loaded), _logits(model))


def test_a_missing_file_is_named(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    _saved(out, tokenizer)
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.json is missing: the checkpoint is incomplete; re-run compress"):
        llmcompress.load(out)
    result = _verify(out)
    assert result.exit_code == 1 and "tokenizer.json is missing" in result.output


def test_a_truncated_file_says_so(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    _saved(out, tokenizer)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt: it has [\d,]+ bytes where [\d,]+ were written"):
        llmcompress.load(out)


def test_the_cli_loads_skip_the_check_with_no_verify(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    _saved(out, tokenizer)
    _flip_byte(out / "model.safetensors", PACKED)
    refused = CliRunner().invoke(main, ["export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "model.safetensors is corrupt" in refused.output and not (tmp_path / "a").exists()
    exported = CliRunner().invoke(main, ["export", str(out), "--format", "compressed-tensors", "--out", str(tmp_path / "b"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    assert _verify(tmp_path / "b").exit_code == 0  # the copy records what it holds
    assert "--no-verify" in CliRunner().invoke(main, ["eval", "--help"]).output


def test_a_checkpoint_from_before_checksums_loads_with_a_note(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    model = _saved(out, tokenizer)
    (out / integrity.CHECKSUM_FILE).unlink()
    with pytest.warns(UserWarning, match="has no llmcompress-checksums.json .* not verified"):
        loaded, _ = llmcompress.load(out)
    assert torch.equal(_logits(loaded), _logits(model))
    result = _verify(out)
    assert result.exit_code == 1 and "nothing to verify it against" in result.output


def test_a_damaged_record_is_refused(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    _saved(out, tokenizer)
    (out / integrity.CHECKSUM_FILE).write_text("{oops")
    with pytest.raises(CheckpointError, match="llmcompress-checksums.json is corrupt"):
        llmcompress.load(out)


def test_a_streamed_run_records_each_block_as_committed(five_block_dir, tmp_path, monkeypatch):
    config = CompressConfig(quant=W4)
    original = rundir.RunDirectory.commit_block

    def stop_after_two(self, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        original(self, index, *args)

    monkeypatch.setattr(rundir.RunDirectory, "commit_block", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        compress_to_disk(five_block_dir, config, tmp_path / "out", calibration="none", progress=False)
    monkeypatch.undo()
    committed = rundir.partial_path(tmp_path / "out") / "model-block-00000.safetensors"
    _flip_byte(committed, "model.layers.0.mlp.up_proj.weight_packed")  # damaged on disk between the sessions
    out, _ = compress_to_disk(five_block_dir, config, tmp_path / "out", calibration="none", progress=False, resume=True)
    with pytest.raises(CheckpointError, match="model-block-00000.safetensors is corrupt"):
        llmcompress.load(out)

    clean, _ = compress_to_disk(five_block_dir, config, tmp_path / "clean", calibration="none", progress=False)
    recorded = integrity.read_record(clean)
    assert {f"model-block-{i:05d}.safetensors" for i in range(5)} | {rundir.OUTSIDE_SHARD, "model.safetensors.index.json"} <= set(recorded)
    result = _verify(clean)
    assert result.exit_code == 0, result.output
    llmcompress.load(clean)


def test_exports_verify_and_still_load_in_transformers(tmp_path, tokenizer):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with_branch = export(_compressed(rank=8), tmp_path / "adapter", format="compressed-tensors", tokenizer=tokenizer)
    assert {f"{ADAPTER_DIR}/adapter_model.safetensors", f"{ADAPTER_DIR}/adapter_config.json"} <= set(integrity.read_record(with_branch))
    assert _verify(with_branch).exit_code == 0
    out = export(_compressed(), tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    assert _verify(out).exit_code == 0
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours, _ = llmcompress.load(out)
    with torch.no_grad():
        # compressed-tensors dequantizes in float16, the scales' dtype, and we in float32: one rounding apart.
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=0, atol=5e-3)

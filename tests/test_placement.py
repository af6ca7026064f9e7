"""--device auto: the decoder blocks spread over the visible GPUs by accelerate's device map,
each block compressed on its GPU with the calibration activations following it."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from click.testing import CliRunner
from conftest import _COMMON
from test_streaming import CONFIG, _files
from transformers import AutoModelForCausalLM, LlamaConfig

from llmcompress import rundir
from llmcompress.api import compress_to_disk
from llmcompress.cli import main
from llmcompress.pipeline import find_decoder_blocks
from llmcompress.pipeline.activations import Activations
from llmcompress.pipeline.placement import block_devices, single_device, spread_over_gpus

GIB = 1 << 30


def _meta_blocks(count: int) -> torch.nn.ModuleList:
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{**_COMMON, "num_hidden_layers": count}))
    return find_decoder_blocks(model)[1]


def _gpu_indices(devices: list[torch.device]) -> list[int]:
    assert all(d.type == "cuda" for d in devices)
    return [d.index for d in devices]


@pytest.mark.parametrize(("count", "gpus"), [(12, 2), (30, 4), (7, 3), (5, 8)])
def test_blocks_are_spread_in_balanced_contiguous_runs(count, gpus):
    indices = _gpu_indices(spread_over_gpus(_meta_blocks(count), {index: 80 * GIB for index in range(gpus)}))
    assert len(indices) == count and indices == sorted(indices)  # contiguous runs: activations hop forward only
    per_gpu = [n for n in (indices.count(g) for g in range(gpus)) if n]
    assert len(per_gpu) == min(count, gpus) and max(per_gpu) - min(per_gpu) <= 1, per_gpu


def test_a_gpu_without_room_for_a_block_gets_none():
    blocks = _meta_blocks(6)
    one_block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    indices = _gpu_indices(spread_over_gpus(blocks, {0: one_block // 2, 1: 80 * GIB, 2: 80 * GIB}))
    assert 0 not in indices and set(indices) == {1, 2}


def test_blocks_no_gpu_can_take_go_to_the_roomiest():
    blocks = _meta_blocks(4)
    one_block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    assert _gpu_indices(spread_over_gpus(blocks, {0: one_block // 2, 1: one_block // 3})) == [0, 0, 0, 0]


def test_one_named_device_takes_every_block():
    blocks = _meta_blocks(3)
    assert block_devices(blocks, "cpu") == [torch.device("cpu")] * 3
    assert single_device("cpu") == "cpu" and single_device("cuda") == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")
def test_auto_without_a_gpu_is_the_cpu_and_changes_no_bit(five_block_dir, tmp_path):
    assert block_devices(_meta_blocks(3), "auto") == [torch.device("cpu")] * 3 and single_device("auto") == "cpu"
    reference, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "reference", calibration="austen:train", progress=False)
    out = tmp_path / "auto"
    result = CliRunner().invoke(main, [str(five_block_dir), "--out", str(out), "--bits", "4", "--group-size", "32", "--method", "gptq",
                                       "--nsamples", "4", "--seqlen", "64", "--no-eval", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert "--device auto: PyTorch sees no GPU, so everything runs on the CPU" in result.output
    assert json.loads((out / "compression_report.json").read_text())["devices"] == ["cpu"]
    weights = {name: data for name, data in _files(out).items() if name.endswith(".safetensors")}
    assert weights and weights == {name: data for name, data in _files(reference).items() if name.endswith(".safetensors")}


def test_activations_follow_the_block_to_its_device():
    cpu = torch.device("cpu")
    store = Activations(cpu)
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 1, 3, 3)
    store.append(hidden, {"attention_mask": mask})
    store.move_to(cpu)
    assert store[0][0] is store._hidden[0]  # the same device: nothing copied
    if torch.cuda.is_available():
        store.move_to(torch.device("cuda", 0))
        moved, kwargs = store[0]
        assert moved.device.type == kwargs["attention_mask"].device.type == "cuda" and torch.equal(moved.cpu(), hidden)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_the_gpus_gives_the_single_gpu_checkpoint(five_block_dir, tmp_path):
    """With one GPU, auto is that GPU; with more, the blocks spread over them and the bytes stay the same."""
    reference, _ = compress_to_disk(five_block_dir, CONFIG, tmp_path / "cuda", calibration="austen:train", device="cuda", progress=False)
    out, report = compress_to_disk(five_block_dir, CONFIG, tmp_path / "auto", calibration="austen:train", device="auto", progress=False)
    assert len(report.devices) == min(torch.cuda.device_count(), 5)
    assert _without_devices(out) == _without_devices(reference)


def _without_devices(directory):
    files = _files(directory)
    report = json.loads(files.pop(rundir.REPORT_FILE))
    report.pop("devices")
    return files, report

"""A fixed set of compression runs on a small deterministic model, and the sha256 of every tensor
each one writes. Recorded once before the pass/recipe refactor (``python tests/golden_runs.py
--record``); ``test_golden.py`` requires the same bytes after it.

The hashes depend on the floating-point path of the machine (torch build, CPU instruction set,
thread count), so the record is keyed by them; on another kind of machine the test says so and
is skipped instead of failing on bits that no code change moved.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import llmcompress
from llmcompress.api import compress_to_disk
from llmcompress.config import (
    CalibConfig,
    CompressConfig,
    GPTQConfig,
    LowRankConfig,
    ModuleOverride,
    PruneConfig,
    QuantFormat,
)

RECORD = Path(__file__).parent / "golden" / "refactor_sha256.json"
VOCAB = 384
CALIB = CalibConfig(nsamples=6, seqlen=48, batch_size=4)
G32 = QuantFormat(bits=4, group_size=32)

RUNS: dict[str, CompressConfig] = {
    "rtn": CompressConfig(quant=G32, calib=CALIB),
    "gptq-act-order": CompressConfig(quant=G32, method="gptq", calib=CALIB, gptq=GPTQConfig(act_order=True, static_groups=False)),
    "awq": CompressConfig(quant=G32, method="awq", calib=CALIB),
    "gptq-eora": CompressConfig(quant=G32, method="gptq", calib=CALIB, lowrank=LowRankConfig(rank=8, method="eora")),
    "svdquant-w4a4": CompressConfig(quant=G32, calib=CALIB, act_bits=4, lowrank=LowRankConfig(rank=8, method="svdquant")),
    "wanda-2of4-rtn": CompressConfig(quant=G32, calib=CALIB, prune=PruneConfig(method="wanda", pattern="2:4")),
    "sparsegpt-gptq": CompressConfig(quant=G32, method="gptq", calib=CALIB, prune=PruneConfig(method="sparsegpt", sparsity=0.5)),
    "nvfp4-lorc": CompressConfig(quant=QuantFormat(kind="nvfp4"), calib=CALIB, lowrank=LowRankConfig(rank=8, method="lorc")),
    "overrides": CompressConfig(quant=G32, method="gptq", calib=CALIB, lowrank=LowRankConfig(rank=4, method="eora", alloc="energy"),
                                overrides=(ModuleOverride(pattern=r"layers\.0\.self_attn\.o_proj", skip=True),
                                           ModuleOverride(pattern="down_proj", bits=8, group_size=-1, rank=0),
                                           ModuleOverride(pattern="q_proj", symmetric=True, rank=8))),
    "awq-gptq": CompressConfig(quant=QuantFormat(bits=3, group_size=32, symmetric=True), method="awq+gptq", calib=CALIB),
    "magnitude-16bit": CompressConfig(quant=None, calib=CALIB, prune=PruneConfig(method="magnitude", sparsity=0.3)),
}
STREAMED = "streamed-gptq"  # the same model saved as shards, compressed block by block from disk
STREAMED_CONFIG = CompressConfig(quant=G32, method="gptq", calib=CALIB, lowrank=LowRankConfig(rank=4))


def machine_key() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {platform.machine()}, {torch.get_num_threads()} threads"


def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (CALIB.nsamples, CALIB.seqlen), generator=torch.Generator().manual_seed(1))


def model():  # noqa: ANN201
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    built = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in built.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    return built.eval()


def tensor_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every tensor in a checkpoint's safetensors files (dtype, shape and bytes)."""
    hashes = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            hashes[name] = digest.hexdigest()
    return dict(sorted(hashes.items()))


def run_in_memory(name: str, config, directory: Path) -> dict[str, str]:  # noqa: ANN001 - a CompressConfig or a recipe
    compressed = llmcompress.compress(model(), config, calibration=windows(), progress=False)
    out = directory / name
    llmcompress.checkpoint.save(compressed, out, compressed.llmcompress_config)
    return tensor_hashes(out)


def run_streamed(config, directory: Path) -> dict[str, str]:  # noqa: ANN001
    source = directory / "source"
    model().save_pretrained(source)
    out, _ = compress_to_disk(source, config, directory / STREAMED, calibration=windows(), progress=False)
    return tensor_hashes(out)


def all_hashes(directory: Path) -> dict[str, dict[str, str]]:
    runs = {name: run_in_memory(name, config, directory) for name, config in RUNS.items()}
    runs[STREAMED] = run_streamed(STREAMED_CONFIG, directory)
    return runs


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/golden_runs.py --record")
    with tempfile.TemporaryDirectory() as scratch:
        recorded = {"machine": machine_key(), "runs": all_hashes(Path(scratch))}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded {sum(len(r) for r in recorded['runs'].values())} tensors of {len(recorded['runs'])} runs on {recorded['machine']}")

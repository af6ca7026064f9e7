"""Peak memory of compressing a model larger than we would like to hold: a synthetic Llama
(random bf16 weights in 2 GB safetensors shards) compressed with GPTQ W4 g128 on the CPU by
the `compress` command, at several depths.

    python eval/streaming_memory.py [--blocks 24,48] [--hidden 2048] [--intermediate 5632]
        [--nsamples 8] [--seqlen 128] [--workdir DIR] [--keep] [--json FILE]

The defaults give about 1.43B parameters at 24 blocks (2.7B at 48). Each run is a fresh
`compress` process measured by `/usr/bin/time -v` (peak RSS is the process's own maximum
resident set size). Memory should be about one block plus the activations, whatever the depth.
The tokenizer is the bundled SmolLM2's, so the vocabulary is 49152.
Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcompress.models import default_model_dir

REPO = Path(__file__).resolve().parent.parent
SHARD_BYTES = 2 * 1000**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_config(blocks: int, hidden: int, intermediate: int, vocab: int):  # noqa: ANN201 - a LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, max_position_embeddings=4096,
                       tie_word_embeddings=False, dtype="bfloat16")


def build_model(directory: Path, config, tokenizer_dir: Path) -> int:  # noqa: ANN001
    """Write the model shard by shard (never whole in memory); returns its parameter count."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            # Norm weights at 1 and projections at std 0.02, as a freshly initialised Llama.
            tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            tensors[name] = tensor.to(torch.bfloat16)
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copy(tokenizer_dir / file, directory / file)
    return sum(torch.Size(s).numel() for s in shapes.values())


def measure(model_dir: Path, out: Path, nsamples: int, seqlen: int) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, str(REPO / "cli.py"), str(model_dir), "--bits", "4", "--group-size", "128",
               "--method", "gptq", "--calib", "austen:train", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-eval",
               "--out", str(out), "--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compress failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr)[1]
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return {"peak_rss_mb": peak_kb / 1024, "wall_seconds": seconds,
            "checkpoint_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="24,48", help="depths to measure, comma separated")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--workdir", default=None, help="where the synthetic models and outputs go [default: a temporary directory]")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models and outputs")
    parser.add_argument("--json", default="eval/results/streaming_memory.json")
    args = parser.parse_args()
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("this program measures peak memory with /usr/bin/time -v: install it (Debian: apt install time)")

    tokenizer_dir = default_model_dir()
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmcompress-streaming-"))
    rows = []
    try:
        for blocks in (int(b) for b in args.blocks.split(",")):
            model_dir = workdir / f"llama-{blocks}blocks"
            config = llama_config(blocks, args.hidden, args.intermediate, vocab)
            if model_dir.is_dir():
                shutil.rmtree(model_dir)
            print(f"building a synthetic Llama with {blocks} blocks in {model_dir}", flush=True)
            parameters = build_model(model_dir, config, tokenizer_dir)
            model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
            print(f"compressing it ({parameters / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB)", flush=True)
            row = {"blocks": blocks, "parameters": parameters, "model_bytes": model_bytes,
                   **measure(model_dir, workdir / f"out-{blocks}blocks", args.nsamples, args.seqlen)}
            rows.append(row)
            print(f"  peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_seconds']:.0f} s", flush=True)
            if not args.keep:
                shutil.rmtree(model_dir)
                shutil.rmtree(workdir / f"out-{blocks}blocks")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nGPTQ W4 g128 asym, calibration austen:train {args.nsamples} x {args.seqlen} tokens, CPU, `compress --no-eval`\n")
    print("| blocks | parameters | model (GB, bf16) | checkpoint (GB) | peak RSS (MB) | wall time (s) | s per block |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['blocks']} | {row['parameters'] / 1e9:.2f}B | {row['model_bytes'] / 1e9:.2f} | {row['checkpoint_bytes'] / 1e9:.2f} | "
              f"{row['peak_rss_mb']:.0f} | {row['wall_seconds']:.0f} | {row['wall_seconds'] / row['blocks']:.1f} |")
    if len(rows) >= 2:
        growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
        print(f"\npeak RSS from {rows[0]['blocks']} to {rows[-1]['blocks']} blocks: {growth:+.1%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "nsamples": args.nsamples, "seqlen": args.seqlen, "hidden": args.hidden,
                                           "intermediate": args.intermediate, "torch": torch.__version__, "python": sys.version,
                                           "machine": platform.platform(), "cpus": torch.get_num_threads()}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

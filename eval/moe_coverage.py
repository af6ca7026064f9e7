"""How much of a mixture-of-experts model llmcompress compresses, and what GPTQ on many small
experts costs in memory and time.

    python eval/moe_coverage.py [--json OUT.json] [--skip-memory] [--families mixtral,olmoe,...]
        [--layers 2] [--nsamples 32] [--seqlen 256]

Part 1, coverage at each family's real default size, on the meta device (no weight is
allocated): every family in FAMILIES is built from ``AutoConfig.for_model(model_type)``, whose
defaults are the released model's sizes. Three shares of the parameters of two or more
dimensions are given:

* before: the model as transformers 5 builds it (experts fused into 3-D parameters), counting
  what the pipeline could see then, the ``nn.Linear`` weights inside the decoder blocks;
* now: after ``unfuse_experts`` (one ``nn.Linear`` per expert projection), what
  ``plan_coverage`` says the default recipe (``CompressConfig()``) compresses;
* in-block: the same, over the weights inside the decoder blocks that are not routers (the
  expert and attention weights), where the aim is 99% or more.

and, for the weights left as they are, why (``Coverage.left()``: reason -> count, parameters).
A family that fails to build or to plan gets a row saying why and the others go on.

Part 2 (``--skip-memory`` leaves it out), GPTQ W4 g64 from disk on a synthetic Qwen3-MoE with
64 experts (hidden 256, expert intermediate 128, 2 blocks by default, top-4 routing, random
float32 weights, ``torch.manual_seed(0)``) and 32 x 256 random calibration tokens: the wall time
and peak RSS of a fresh process running ``compress_to_disk`` (its own VmHWM, not ru_maxrss, which
Linux carries over from this process across the fork and exec), split by a sampling thread into
its peak anonymous memory and its peak file-backed pages (the model's safetensors as the reader
maps them, which the kernel drops under memory pressure), beside a process that only
imports torch, transformers and llmcompress; the size of one block's float32 weights and of one
block's statistics (in_features^2 float32 per group of Linears that read the same input: an
expert's gate/up, attention q/k/v); and how many experts fell back to data-free compression for
too few routed tokens, with the fewest and median tokens an expert saw.

Prints Markdown tables and writes JSON (default ``eval/results/moe_coverage.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "gpt_oss", "llama4_text", "olmoe", "llama")
RECIPE = {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 64}}]}
SHARES_INPUT = ({"gate_proj", "up_proj"}, {"q_proj", "k_proj", "v_proj"})  # sibling Linears that read the same tensor


# ---------------------------------------------------------------- Part 1: coverage on meta

def meta_model(model_type: str):  # noqa: ANN201 - a PreTrainedModel on the meta device
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    # init_empty_weights alone still creates each parameter on the CPU before moving it to meta:
    # DeepSeek-V3's fused experts are 30 GB per block (out of memory here), and Llama 4's took minutes.
    # Under torch.device("meta") nothing is allocated; buffers are on meta too, which nothing here reads.
    with torch.device("meta"), accelerate.init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _weights(module: torch.nn.Module):  # noqa: ANN202 - (name, parameter) of every >=2-D parameter, shared ones once
    seen: set[int] = set()
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if parameter.dim() >= 2 and id(parameter) not in seen:
            seen.add(id(parameter))
            yield name, parameter


def share_before(model: torch.nn.Module) -> dict:
    """What the pipeline could see before experts were unfused: nn.Linear weights inside the blocks."""
    from llmcompress.pipeline import find_decoder_blocks

    total = sum(p.numel() for _, p in _weights(model))
    _, blocks = find_decoder_blocks(model)
    seen: set[int] = set()
    visible = 0
    for module in blocks.modules():
        if isinstance(module, torch.nn.Linear):
            for parameter in module.parameters(recurse=False):
                if parameter.dim() >= 2 and id(parameter) not in seen:
                    seen.add(id(parameter))
                    visible += parameter.numel()
    return {"parameters": total, "linear_in_blocks": visible, "share": visible / total if total else 0.0}


def coverage_row(model_type: str) -> dict:
    from llmcompress.config import CompressConfig
    from llmcompress.experts import unfuse_experts
    from llmcompress.flags import recipe_from_config
    from llmcompress.pipeline import find_decoder_blocks
    from llmcompress.pipeline.coverage import COMPRESSED, plan_coverage
    from llmcompress.pipeline.structure import plan_layers

    row: dict = {"family": model_type}
    started = time.perf_counter()
    stage = "build"
    try:
        model = meta_model(model_type)
        row["class"] = type(model).__name__
        stage = "share before unfusing"
        row["before"] = share_before(model)  # the model as built: fused experts, not unfused
        stage = "unfuse_experts"
        row["unfused"] = unfuse_experts(model)
        stage = "find_decoder_blocks"
        blocks_path, blocks = find_decoder_blocks(model)
        row["blocks_path"], row["num_blocks"] = blocks_path, len(blocks)
        stage = "plan_coverage"
        coverage = plan_coverage(model, blocks_path, blocks, *plan_layers(blocks, blocks_path, recipe_from_config(CompressConfig())))
    except Exception as error:  # noqa: BLE001 - one family's failure is a row of the table
        row["error"] = f"{stage}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        row["seconds"] = time.perf_counter() - started
        return row
    total = sum(w.parameters for w in coverage.weights)
    in_blocks = [w for w in coverage.weights if w.name.startswith(f"{blocks_path}.") and not w.status.startswith("router")]
    in_blocks_total = sum(w.parameters for w in in_blocks)
    statuses: dict[str, list[int]] = {}
    for weight in coverage.weights:
        if weight.status != COMPRESSED:
            entry = statuses.setdefault(weight.status, [0, 0])
            entry[0] += 1
            entry[1] += weight.parameters
    row.update({
        "parameters": total,
        "compressed_parameters": sum(w.parameters for w in coverage.weights if w.status == COMPRESSED),
        "share_now": coverage.share,
        "in_block_non_router_parameters": in_blocks_total,
        "in_block_non_router_share": (sum(w.parameters for w in in_blocks if w.status == COMPRESSED) / in_blocks_total
                                      if in_blocks_total else 0.0),
        "left": {reason: {"count": count, "parameters": parameters} for reason, (count, parameters) in coverage.left().items()},
        "left_by_status": {status: {"count": count, "parameters": parameters} for status, (count, parameters) in statuses.items()},
        "num_weights": len(coverage.weights),
        "seconds": time.perf_counter() - started,
    })
    return row


def _short_reason(reason: str) -> str:
    return reason.split(" (")[0]


def print_coverage(rows: list[dict]) -> None:
    print("\nShare of the >=2-D parameters compressed by the default recipe (RTN W4 g128), real default sizes, meta device\n")
    print("| family | params (B) | before (fused experts invisible) | now | in-block non-router now | left (count, params) |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['family']} | - | - | - | - | failed: {row['error']} |")
            continue
        left = "; ".join(f"{_short_reason(reason)} {entry['count']} ({entry['parameters'] / 1e9:.3g}B)"
                         for reason, entry in sorted(row["left"].items(), key=lambda item: -item[1]["parameters"]))
        print(f"| {row['family']} | {row['parameters'] / 1e9:.2f} | {100 * row['before']['share']:.2f}% | {100 * row['share_now']:.2f}% "
              f"| {100 * row['in_block_non_router_share']:.3f}% | {left or '-'} |")


# ---------------------------------------------------------------- Part 2: GPTQ memory on a tiny 64-expert MoE

# A child's peak is read from VmHWM, the high-water mark of its own address space: Linux carries
# ru_maxrss across exec, so a child forked from this (larger) process would report at least this
# process's resident size at the fork. ru_maxrss is kept in the JSON beside it.
PEAK = r'''
def peak_rss_kib():
    import resource
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
'''

BASELINE = PEAK + r'''
import json, resource
import torch, transformers, llmcompress, llmcompress.api
with open("/proc/self/status") as status:
    resident = {line.split(":")[0]: int(line.split()[1]) for line in status if line.split(":")[0] in ("RssAnon", "RssFile")}
print(json.dumps({"peak_kib": peak_rss_kib(), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "anon_kib": resident.get("RssAnon", 0), "file_kib": resident.get("RssFile", 0)}))
'''

# VmHWM counts the model's safetensors pages the reader maps (file-backed, dropped by the kernel
# under memory pressure) with the process's own memory: a thread samples the two apart.
SAMPLER = r'''
import threading
resident_peaks = {"RssAnon": 0, "RssFile": 0}
def _sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in resident_peaks:
                    resident_peaks[key] = max(resident_peaks[key], int(line.split()[1]))
        time.sleep(0.002)
threading.Thread(target=_sample, daemon=True).start()
'''

COMPRESS = PEAK + r'''
import json, resource, sys, time
import torch
from llmcompress.api import compress_to_disk
''' + SAMPLER + r'''
model_dir, out_dir, recipe, nsamples, seqlen, vocab = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
windows = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
started = time.perf_counter()
path, report = compress_to_disk(model_dir, recipe, out_dir, calibration=windows, progress=False)
seconds = time.perf_counter() - started
layers = [{"name": r.name, "tokens": r.tokens, "fallback": r.fallback, "seconds": r.seconds} for r in report.layers]
print(json.dumps({"seconds": seconds, "report_seconds": report.seconds, "calibration_tokens": report.calibration_tokens,
                  "peak_kib": peak_rss_kib(), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "layers": layers,
                  "peak_anon_kib": resident_peaks["RssAnon"], "peak_file_kib": resident_peaks["RssFile"]}))
'''


def tiny_moe_config(layers: int, experts: int = 64):  # noqa: ANN201 - a Qwen3MoeConfig
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=experts, num_experts_per_tok=4,
                                vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32")


def block_sizes(config) -> dict:  # noqa: ANN001
    """One decoder block's float32 weights, and the statistics GPTQ keeps for it (one
    in_features^2 float32 matrix per group of compressed Linears that read the same input)."""
    import accelerate
    from transformers import AutoModelForCausalLM

    from llmcompress.experts import unfuse_experts
    from llmcompress.flags import as_recipe
    from llmcompress.pipeline import find_decoder_blocks
    from llmcompress.pipeline.structure import plan_layers

    with torch.device("meta"), accelerate.init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    blocks_path, blocks = find_decoder_blocks(model)
    block = blocks[0]
    weight_bytes = sum(p.numel() * 4 for p in block.parameters())
    targets, _ = plan_layers(blocks, blocks_path, as_recipe(RECIPE))
    groups: dict[tuple[str, str], int] = {}
    for target in targets:
        if target.block != 0:
            continue
        module = block.get_submodule(target.local_name)
        parent, _, leaf = target.local_name.rpartition(".")
        shared = next((",".join(sorted(names)) for names in SHARES_INPUT if leaf in names), leaf)
        groups[(parent, shared)] = module.in_features
    return {"block_weight_bytes": weight_bytes, "block_statistics_bytes": sum(n * n * 4 for n in groups.values()),
            "block_statistics_matrices": len(groups), "block_compressed_linears": sum(1 for t in targets if t.block == 0)}


def _child(code: str, *arguments: str) -> tuple[dict, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *arguments], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"child process failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), wall


def memory_run(layers: int, nsamples: int, seqlen: int, num_experts: int = 64) -> dict:
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(layers, num_experts)
    result: dict = {"model": {"model_type": "qwen3_moe", "hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 512,
                              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                              "num_experts": num_experts, "num_experts_per_tok": 4, "vocab_size": 1024, "dtype": "float32"},
                    "recipe": RECIPE, "calibration": [nsamples, seqlen], "torch_threads": torch.get_num_threads()}
    result.update(block_sizes(config))
    baseline, _ = _child(BASELINE)
    result["baseline_peak_rss_bytes"] = baseline["peak_kib"] * 1024
    result["baseline_ru_maxrss_bytes"] = baseline["maxrss_kib"] * 1024
    result["baseline_anon_bytes"], result["baseline_file_bytes"] = baseline["anon_kib"] * 1024, baseline["file_kib"] * 1024
    with tempfile.TemporaryDirectory(prefix="moe_coverage_") as scratch:
        model_dir, out_dir = Path(scratch) / "model", Path(scratch) / "out"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        del model
        result["model_bytes_on_disk"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        child, wall = _child(COMPRESS, str(model_dir), str(out_dir), json.dumps(RECIPE), str(nsamples), str(seqlen), "1024")
    result.update({"wall_seconds": wall, "compress_seconds": child["seconds"], "peak_rss_bytes": child["peak_kib"] * 1024,
                   "ru_maxrss_bytes": child["maxrss_kib"] * 1024, "calibration_tokens": child["calibration_tokens"],
                   "peak_anon_bytes": child["peak_anon_kib"] * 1024, "peak_file_bytes": child["peak_file_kib"] * 1024,
                   "layer_seconds": sum(layer["seconds"] for layer in child["layers"])})
    experts: dict[str, dict] = {}
    for layer in child["layers"]:
        if ".experts." not in layer["name"]:
            continue
        expert = experts.setdefault(layer["name"].rpartition(".")[0], {"tokens": layer["tokens"], "fallback": False})
        expert["fallback"] = expert["fallback"] or layer["fallback"]
        if layer["tokens"] is not None:
            expert["tokens"] = min(expert["tokens"] if expert["tokens"] is not None else layer["tokens"], layer["tokens"])
    tokens = [e["tokens"] for e in experts.values() if e["tokens"] is not None]
    result.update({"layers_compressed": len(child["layers"]), "experts": len(experts),
                   "experts_fallback": sum(e["fallback"] for e in experts.values()),
                   "expert_tokens_min": min(tokens) if tokens else None,
                   "expert_tokens_median": statistics.median(tokens) if tokens else None,
                   "expert_tokens_max": max(tokens) if tokens else None,
                   "layers": child["layers"]})
    return result


def print_memory(result: dict) -> None:
    mb = 1e6
    print(f"\nGPTQ W4 g64 from disk (compress_to_disk), synthetic Qwen3-MoE: {result['model']['num_hidden_layers']} blocks x "
          f"{result['model']['num_experts']} experts, "
          f"hidden 256, expert intermediate 128, {result['parameters'] / 1e6:.1f}M parameters float32, "
          f"{result['calibration'][0]} x {result['calibration'][1]} random tokens, {result['torch_threads']} torch threads, "
          f"{platform.processor() or platform.machine()}\n")
    print("| measure | value |\n|---|---:|")
    rows = [
        ("compress_to_disk time (s)", f"{result['compress_seconds']:.1f}"),
        ("child process wall time, imports included (s)", f"{result['wall_seconds']:.1f}"),
        ("of which in the layers' own compression (sum of the report's per-layer seconds)", f"{result['layer_seconds']:.1f}"),
        ("peak RSS of the compressing process (MB)", f"{result['peak_rss_bytes'] / mb:.0f}"),
        ("peak RSS of a process that only imports torch, transformers, llmcompress (MB)", f"{result['baseline_peak_rss_bytes'] / mb:.0f}"),
        ("peak RSS above that baseline (MB)", f"{(result['peak_rss_bytes'] - result['baseline_peak_rss_bytes']) / mb:.0f}"),
        ("model on disk (MB)", f"{result['model_bytes_on_disk'] / mb:.1f}"),
        ("one block's float32 weights (MB)", f"{result['block_weight_bytes'] / mb:.1f}"),
        (f"one block's statistics (MB, {result['block_statistics_matrices']} matrices for {result['block_compressed_linears']} Linears)",
         f"{result['block_statistics_bytes'] / mb:.1f}"),
        ("layers compressed / experts", f"{result['layers_compressed']} / {result['experts']}"),
        ("experts that fell back (too few tokens)", f"{result['experts_fallback']}"),
        ("tokens per expert: min / median / max", f"{result['expert_tokens_min']} / {result['expert_tokens_median']} / {result['expert_tokens_max']}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


def print_scaling(runs: list[dict]) -> None:
    """Peak memory against experts and depth: what grows with a block, and what does not grow with depth."""
    mb = 1e6
    print("\nPeak RSS of GPTQ from disk against the block's size and the depth\n")
    print("| experts | blocks | one block's weights + statistics (MB) | peak RSS (MB) | above import-only (MB) | "
          "peak anonymous above import-only (MB) | peak file-backed above import-only (MB) | time (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run['model']['num_experts']} | {run['model']['num_hidden_layers']} | "
              f"{(run['block_weight_bytes'] + run['block_statistics_bytes']) / mb:.1f} | {run['peak_rss_bytes'] / mb:.0f} | "
              f"{(run['peak_rss_bytes'] - run['baseline_peak_rss_bytes']) / mb:.0f} | "
              f"{(run['peak_anon_bytes'] - run['baseline_anon_bytes']) / mb:.0f} | "
              f"{(run['peak_file_bytes'] - run['baseline_file_bytes']) / mb:.0f} | {run['compress_seconds']:.1f} |")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(scratch, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=REPO / "eval" / "results" / "moe_coverage.json")
    parser.add_argument("--skip-memory", action="store_true", help="leave out Part 2 (GPTQ on the tiny 64-expert MoE)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="transformers model types for Part 1")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the Part 2 model")
    parser.add_argument("--scaling", default="16x2,128x2,64x4", metavar="EXPERTSxBLOCKS,...",
                        help="further Part 2 runs, for peak memory against block size and depth ('' for none)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()

    import transformers

    import llmcompress

    output: dict = {"llmcompress_version": llmcompress.__version__, "transformers_version": transformers.__version__,
                    "torch_version": torch.__version__, "machine": platform.processor() or platform.machine(), "coverage": []}
    for family in args.families.split(","):
        row = coverage_row(family.strip())
        output["coverage"].append(row)
        status = row.get("error") or f"{100 * row['share_now']:.2f}% compressed"
        print(f"{family}: {status} ({row['seconds']:.1f} s)", flush=True)
    print_coverage(output["coverage"])
    write_json(args.json, output)
    if not args.skip_memory:
        print("\nPart 2: compressing the synthetic 64-expert MoE ...", flush=True)
        output["memory"] = memory_run(args.layers, args.nsamples, args.seqlen)
        print_memory(output["memory"])
        runs = [output["memory"]]
        for item in filter(None, args.scaling.split(",")):
            experts, blocks = (int(n) for n in item.split("x"))
            runs.append(memory_run(blocks, args.nsamples, args.seqlen, experts))
        output["scaling"] = [{key: value for key, value in run.items() if key != "layers"} for run in runs]
        print_scaling(runs)
        write_json(args.json, output)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

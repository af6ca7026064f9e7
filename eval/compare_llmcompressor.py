"""Our GPTQ / AWQ / Wanda / SparseGPT against vLLM's llm-compressor on the same model, windows
and evaluation.

    python eval/compare_llmcompressor.py --lc-python /path/to/venv/bin/python \
        [--formats w4g64,w4g64s,w3g64] [--methods gptq,awq] [--nsamples 128] [--seqlen 512]
    python eval/compare_llmcompressor.py --lc-python ... --methods none \
        --prune-methods wanda,sparsegpt --patterns unstructured,2:4 [--sparsity 0.5]

llm-compressor lives in its own virtual environment (it pins its own transformers):
    python3 -m venv lcvenv && lcvenv/bin/pip install torch==2.13.0 llmcompressor
Without ``--lc-python`` (or when llmcompressor does not import there) the program says so and
exits 0, so it can sit in any pipeline.

Both toolkits get the very same token windows (drawn here with our seeded sampler), and
perplexity is measured by this repository's ``llmcompress.evaluate`` in both environments,
so the protocol is identical. llm-compressor's GPTQ runs with its defaults (static act-order,
dampening 0.01, block 128); its AWQ is ``AWQModifier`` followed by ``QuantizationModifier``; its pruning is
``WandaPruningModifier`` / ``SparseGPTModifier`` (defaults: block 128, dampening 0.01), weights
left in 16 bits, and ours prunes alone (``--bits 16``) with its defaults. On a machine
without a GPU its AWQ needs the activation cache's (speed-only) memory pinning turned off, and
float32 calibration (float16 gives NaN losses on the CPU); its GPTQ and pruning calibrate in
each dtype of ``--lc-dtypes`` (default float16: the bundled model's dtype, what it does unless told
otherwise; bfloat16: the dtype ours picks on a CPU with native bfloat16). Ours runs with its
defaults (``calibration.compute_dtype: auto``). Everything is evaluated by ``perplexity`` with its
defaults (bfloat16 on such a CPU), the compressed weights first cast back to float16.
Each run is a separate process; time is the compression call alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcompress.calib import calibration_windows
from llmcompress.config import PruneConfig
from llmcompress.models import default_model_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path, and so find quant_methods
import quant_methods  # noqa: E402

DRIVER = r'''
import json, resource, sys, time, torch
args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from llmcompress.evaluate import perplexity

if not torch.cuda.is_available():
    # llm-compressor 0.14's AWQ pins its activation cache unconditionally, which raises without a
    # GPU. Pinning only speeds host-to-GPU copies; skipping it changes no number.
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
windows = torch.load(args["windows"])
# AWQ calibrates in float32: llm-compressor 0.14's AWQ grid search yields NaN losses in float16
# on the CPU (the weights come from float16, so float32 holds them exactly).
calibration_dtype = torch.float32 if args["method"] == "awq" else getattr(torch, args["dtype"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=calibration_dtype)
tokenizer = AutoTokenizer.from_pretrained(args["model"])
dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": args.get("bits"), "type": "int", "symmetric": args.get("symmetric"),
                                                         "strategy": "group", "group_size": args.get("group_size")}}}
if args["method"] in ("wanda", "sparsegpt"):
    # llm-compressor writes N:M as "pruned:group" ("2:4" prunes 2 of 4) and unstructured as "0:0".
    n_m = args["pattern"].split(":") if args["pattern"] != "unstructured" else None
    structure = "0:0" if n_m is None else f"{int(n_m[1]) - int(n_m[0])}:{n_m[1]}"
    modifier = WandaPruningModifier if args["method"] == "wanda" else SparseGPTModifier
    recipe = [modifier(sparsity=args["sparsity"], mask_structure=structure, targets=["Linear"], ignore=["lm_head"])]
elif args["method"] == "gptq":
    recipe = [GPTQModifier(config_groups=scheme, ignore=["lm_head"])]
else:
    recipe = [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
started = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
seconds = time.perf_counter() - started
model = model.to(torch.float16)  # stored as ours is, and evaluated the same way
result = perplexity(model, tokenizer, args["text"], seqlen=args["eval_seqlen"], max_windows=args["eval_windows"], progress=False)
print("RESULT " + json.dumps({"perplexity": result.perplexity, "protocol": result.protocol, "compress_seconds": seconds,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def _llmcompressor_available(python: str | None) -> str | None:
    if not python:
        return "no --lc-python given"
    if not Path(python).exists():
        return f"{python} does not exist"
    check = subprocess.run([python, "-c", "import llmcompressor"], capture_output=True, text=True)
    return None if check.returncode == 0 else f"llmcompressor does not import with {python}: {check.stderr.strip()[-300:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lc-python", default=None, help="python of a virtual environment with llmcompressor")
    parser.add_argument("--methods", default="gptq,awq", help="quantization methods, or none")
    parser.add_argument("--formats", default="w4g64,w4g64s,w3g64")
    parser.add_argument("--prune-methods", default="", help="wanda,sparsegpt (weights left in 16 bits)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured patterns")
    parser.add_argument("--lc-dtypes", default="float16", help="llm-compressor's calibration dtypes for GPTQ and pruning: float16,bfloat16")
    quant_methods.add_protocol_arguments(parser)
    parser.add_argument("--json", default="eval/results/compare_llmcompressor.json")
    args = parser.parse_args()
    missing = _llmcompressor_available(args.lc_python)
    if missing:
        print(f"skipping the llm-compressor comparison: {missing}")
        return

    model_dir = str(default_model_dir())
    from transformers import AutoTokenizer

    windows = calibration_windows(args.calib, AutoTokenizer.from_pretrained(model_dir), args.nsamples, args.seqlen, seed=0)
    common = {"repo": str(REPO), "model": model_dir, "text": args.text, "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows or None}
    pairs = []  # (method, setting, llm-compressor's job, our run_one job)
    for spec in args.formats.split(",") if args.methods != "none" else []:
        fmt = quant_methods.parse_format(spec)
        for method in args.methods.split(","):
            theirs = {"method": method, "bits": fmt.bits, "symmetric": fmt.symmetric, "group_size": fmt.group_size}
            pairs.append((method, spec, theirs, {"method": method, "format": spec}))
    for pattern in args.patterns.split(",") if args.prune_methods else []:
        sparsity = args.sparsity if pattern == "unstructured" else None
        setting = f"{sparsity:.0%} unstructured" if sparsity is not None else pattern
        for method in args.prune_methods.split(","):
            prune = {"method": method, "pattern": pattern, "sparsity": sparsity}
            theirs = {"method": method, "pattern": pattern, "sparsity": PruneConfig(**prune).sparsity}
            pairs.append((method, setting, theirs, {"method": "rtn", "format": "16bit", "prune": prune}))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        windows_file = Path(scratch) / "windows.pt"
        torch.save(windows, windows_file)
        for method, setting, theirs, ours in pairs:
            ours_job = {**quant_methods.protocol_job(args, model_dir), **ours}
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                mine = {"toolkit": "llmcompress", "setting": setting, **pool.apply(quant_methods.run_one, (ours_job,)), "method": method}
            rows.append(mine)
            _print_row(mine)
            for dtype in ["float32"] if method == "awq" else args.lc_dtypes.split(","):
                job = {**common, **theirs, "dtype": dtype, "windows": str(windows_file)}
                started = time.perf_counter()
                done = subprocess.run([args.lc_python, "-c", DRIVER, json.dumps(job)], capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                row = {"toolkit": "llm-compressor", "method": method, "setting": setting, "calibration_dtype": dtype}
                if done.returncode != 0 or not lines:
                    print(f"llm-compressor {method} {setting} {dtype} failed after {time.perf_counter() - started:.0f} s:\n{done.stderr[-2000:]}")
                    row["error"] = done.stderr[-2000:]
                else:
                    row.update(json.loads(lines[-1][7:]), speedup=json.loads(lines[-1][7:])["compress_seconds"] / mine["compress_seconds"])
                rows.append(row)
                _print_row(row)

    print(f"\n{next((r['protocol'] for r in rows if 'protocol' in r), '')}; calibration {args.calib}, {args.nsamples} x {args.seqlen} tokens\n")
    print("| method | setting | toolkit | calibration dtype | ppl | time (s) | their time / ours |")
    print("|---|---|---|---|---:|---:|---:|")
    for row in rows:
        dtype = row.get("calibration_dtype") or row.get("compute_dtype", "")
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"| {row['method']} | {row['setting']} | {row['toolkit']} | {dtype} | {row.get('perplexity', float('nan')):.3f} | "
              f"{row.get('compress_seconds', float('nan')):.1f} | {speedup} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "python": sys.version}, indent=2))
    print(f"\nwrote {args.json}")


def _print_row(row: dict) -> None:
    dtype = row.get("calibration_dtype") or row.get("compute_dtype", "")
    print(f"{row['toolkit']:15s} {row['method']:9s} {row['setting']:16s} {dtype:9s} ppl {row.get('perplexity', float('nan')):8.3f}  "
          f"{row.get('compress_seconds', float('nan')):7.1f} s  {row.get('peak_rss_mb', float('nan')):6.0f} MB", flush=True)


if __name__ == "__main__":
    main()

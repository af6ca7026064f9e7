"""Rotations and quantized activations, side by side: held-out perplexity for each scheme, with
and without the ``rotate`` pass, under RTN and GPTQ.

    python eval/rotation_grid.py [--methods rtn,gptq] [--schemes w4a16-g128,w3-g64,...] [--windows 16]
                                 [--json eval/results/rotation_grid.json]

Uses only the public API. Every row compresses the model in memory from its float weights and
scores it on the same windows; the JSON is rewritten after each row, so a long grid can be read
while it runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import llmcompress
from llmcompress.evaluate import perplexity
from llmcompress.models import load_model

# Weights, then activations (per token, dynamic, unless stated). W8 weights are INT8 per channel,
# symmetric: W8A8 FP8 stands for FP8 activations on INT8 weights (FP8 weights are not a format yet).
SCHEMES = {
    "w4a16-g128": {"bits": 4, "group_size": 128},
    "w3-g64": {"bits": 3, "group_size": 64},
    "w4a8-int8": {"bits": 4, "group_size": 128, "act_bits": 8},
    "w4a8-fp8": {"bits": 4, "group_size": 128, "act_bits": 8, "act_kind": "fp8_e4m3"},
    "w8a8-int8": {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8},
    "w8a8-fp8": {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_kind": "fp8_e4m3"},
    "w4a4": {"bits": 4, "group_size": 128, "act_bits": 4, "act_group_size": -1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--text", default="austen:test")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--calib", default="austen:train")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--json", default="eval/results/rotation_grid.json")
    args = parser.parse_args()
    methods, schemes = args.methods.split(","), args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(unknown)}: choose from {', '.join(SCHEMES)}")

    model, tokenizer = load_model(args.model)
    baseline = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=args.windows, progress=False)
    print(f"float: {baseline.perplexity:.3f} ({baseline.protocol})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"protocol": baseline.to_dict(), "float": baseline.perplexity, "rows": [], "machine": platform.platform(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "llmcompress": llmcompress.__version__,
               "commit": commit, "calibration": f"{args.calib}, {args.nsamples} windows of {args.calib_seqlen} tokens"}
    for method in methods:
        for scheme in schemes:
            for rotate in (False, True):
                model, tokenizer = load_model(args.model)
                passes = ([{"rotate": {}}] if rotate else []) + [{"quantize": {"method": method, **SCHEMES[scheme]}}]
                recipe = {"calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen}, "passes": passes}
                started = time.perf_counter()
                llmcompress.compress(model, recipe, tokenizer=tokenizer, calibration=args.calib if method == "gptq" else None,
                                     progress=False)
                seconds = time.perf_counter() - started
                result = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=args.windows, progress=False)
                row = {"method": method, "scheme": scheme, "rotate": rotate, "perplexity": result.perplexity,
                       "increase_over_float": result.perplexity / baseline.perplexity - 1, "compress_seconds": seconds}
                payload["rows"].append(row)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(payload, indent=2))
                print(f"{method:4s} {scheme:11s} {'rotated' if rotate else 'plain':7s} ppl {result.perplexity:9.3f} "
                      f"(+{100 * row['increase_over_float']:.1f}%)  {seconds:.0f} s", flush=True)

    print(f"\n{args.model or 'SmolLM2-135M-Instruct'}; float {baseline.perplexity:.3f}; {baseline.protocol}\n")
    print("| method | scheme | plain | rotated | increase over float: plain -> rotated |")
    print("|---|---|---:|---:|---:|")
    rows = {(r["method"], r["scheme"], r["rotate"]): r for r in payload["rows"]}
    for method in methods:
        for scheme in schemes:
            plain, rotated = rows[(method, scheme, False)], rows[(method, scheme, True)]
            print(f"| {method} | {scheme} | {plain['perplexity']:.3f} | {rotated['perplexity']:.3f} | "
                  f"+{100 * plain['increase_over_float']:.1f}% -> +{100 * rotated['increase_over_float']:.1f}% |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

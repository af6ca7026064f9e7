"""Round-to-nearest across number formats on one model: perplexity, bits per weight, time.

    python eval/rtn_formats.py [--model DIR] [--windows 40] [--json eval/results/rtn_formats.json]

Uses only the public API. Prints a Markdown table and writes JSON with the protocol.
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
from llmcompress import CompressConfig, QuantFormat
from llmcompress.evaluate import perplexity
from llmcompress.models import load_model
from llmcompress.summary import size_summary

FORMATS = [
    QuantFormat(bits=8, group_size=128),
    QuantFormat(bits=4, group_size=128),
    QuantFormat(bits=4, group_size=128, symmetric=True),
    QuantFormat(bits=4, group_size=64),
    QuantFormat(bits=4, group_size=-1),
    QuantFormat(kind="nvfp4"),
    QuantFormat(kind="mxfp4"),
    QuantFormat(bits=3, group_size=128),
    QuantFormat(bits=3, group_size=64),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--text", default="austen:test")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows (0 = all)")
    parser.add_argument("--json", default="eval/results/rtn_formats.json")
    args = parser.parse_args()
    windows = args.windows or None

    model, tokenizer = load_model(args.model)
    baseline = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=windows, progress=False)
    rows = [{"format": "float16", "perplexity": baseline.perplexity, "layer_bits_per_weight": 16.0, "seconds": 0.0}]
    for fmt in FORMATS:
        model, tokenizer = load_model(args.model)
        started = time.perf_counter()
        llmcompress.compress(model, CompressConfig(quant=fmt), progress=False)
        seconds = time.perf_counter() - started
        result = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=windows, progress=False)
        size = size_summary(model)
        rows.append({"format": fmt.describe(), "perplexity": result.perplexity, "layer_bits_per_weight": size.layer_bits_per_weight,
                     "model_bits_per_weight": size.bits_per_weight, "seconds": seconds})
        print(f"{fmt.describe():24s} ppl {result.perplexity:8.3f}  {size.layer_bits_per_weight:.3f} bits/weight", flush=True)

    print(f"\nRTN on {args.model or 'SmolLM2-135M-Instruct'}; {baseline.protocol}\n")
    print("| format | perplexity | vs float | bits/weight (quantized layers) | RTN time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['format']} | {row['perplexity']:.3f} | {row['perplexity'] / baseline.perplexity:.3f}x | "
              f"{row['layer_bits_per_weight']:.3f} | {row['seconds']:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"protocol": baseline.to_dict(), "rows": rows, "machine": platform.platform(), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "llmcompress": llmcompress.__version__, "commit": commit}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""What a group size that does not divide a layer's inputs costs: SmolLM2's 576-input layers at g128.

    python eval/ragged_groups.py [--model DIR] [--windows 40] [--json eval/results/ragged_groups.json]

RTN INT4 asymmetric, held-out perplexity (bfloat16 compute) and bits per weight of the
quantized layers, for the ways a request of g128 can meet 576 inputs (4.5 groups):

- ``fitted``: what the pipeline does, g64 on the 576-input layers (the largest divisor not
  above 128 that every vLLM kernel takes) and g128 on down_proj (1536 inputs);
- ``g96``: the largest divisor at all (Marlin has no g96), through per-module overrides;
- ``ragged g128``: a last group of 64 columns, as checkpoints before the fitting held it (no
  serving format stores it), made with the pure RTN functions since the pipeline no longer
  makes it;
- ``g64``: uniform, for reference.

Prints a Markdown table and writes JSON with the protocol.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch import nn

import llmcompress
from llmcompress.config import QuantFormat
from llmcompress.evaluate import perplexity
from llmcompress.formats import dequantize, num_groups
from llmcompress.methods.rtn import rtn
from llmcompress.models import load_model
from llmcompress.summary import size_summary

REQUEST = 128
SCALE_BITS = 16


def _recipe(group: int, overrides: list[dict] | None = None) -> dict:
    quantize = {"method": "rtn", "bits": 4, "group_size": group, "symmetric": False}
    if overrides:
        quantize["overrides"] = overrides
    return {"passes": [{"quantize": quantize}]}


def _ragged(model: nn.Module) -> float:
    """RTN with a ragged last group on every block Linear, in place; the layers' bits per weight."""
    fmt = QuantFormat(bits=4, group_size=REQUEST, symmetric=False)
    bits = weights = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            weight = module.weight.detach()
            module.weight.data = dequantize(rtn(weight.float(), fmt), fmt).to(weight.dtype)
            rows, cols = weight.shape
            # codes, plus a float16 scale and a 4-bit zero point per (row, group)
            bits += rows * cols * fmt.bits + rows * num_groups(fmt, cols) * (SCALE_BITS + fmt.bits)
            weights += rows * cols
    return bits / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--text", default="austen:test")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--json", default="eval/results/ragged_groups.json")
    args = parser.parse_args()

    def score(model: nn.Module, tokenizer) -> float:  # noqa: ANN001
        return perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=args.windows, progress=False,
                          dtype="bfloat16").perplexity

    rows = []
    model, tokenizer = load_model(args.model)
    rows.append({"config": "float", "perplexity": score(model, tokenizer), "layer_bits_per_weight": 16.0, "groups": "-"})
    narrow = [{"pattern": r"(q|k|v|o|gate|up)_proj", "group_size": 96}]
    for label, recipe, groups in [("fitted (default)", _recipe(REQUEST), "g64 on 576 inputs, g128 on 1536"),
                                  ("g96", _recipe(REQUEST, narrow), "g96 on 576 inputs, g128 on 1536"),
                                  ("g64", _recipe(64), "g64 everywhere")]:
        model, tokenizer = load_model(args.model)
        llmcompress.compress(model, recipe, calibration="none", progress=False)
        rows.append({"config": label, "perplexity": score(model, tokenizer),
                     "layer_bits_per_weight": size_summary(model).layer_bits_per_weight, "groups": groups})
        print(rows[-1], flush=True)
    model, tokenizer = load_model(args.model)
    bits = _ragged(model)
    rows.append({"config": "ragged g128 (before)", "perplexity": score(model, tokenizer), "layer_bits_per_weight": bits,
                 "groups": "4 of 128 + 1 of 64 on 576 inputs; no export holds it"})

    print("\n| config | perplexity | bits/weight (layers) | groups |\n|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['config']} | {row['perplexity']:.3f} | {row['layer_bits_per_weight']:.4f} | {row['groups']} |")
    protocol = {"text": args.text, "seqlen": args.seqlen, "windows": args.windows, "dtype": "bfloat16", "quantizer": "RTN INT4 asym",
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

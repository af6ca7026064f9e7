"""Pruning methods side by side on one model: method x pattern x (16-bit or W4) x (EoRA or not)
-> perplexity, bytes on disk, compression time.

    python eval/prune_methods.py --methods magnitude,wanda,sparsegpt --patterns unstructured,2:4 \
        --formats 16bit,w4g128 --ranks 0,64 [--quant-method gptq] [--sparsity 0.5] [--json FILE]

Every configuration runs in its own process on the same calibration windows (seeded) and the
same held-out evaluation text (see ``quant_methods``), and writes its checkpoint to a scratch
directory to measure the bytes on disk (all safetensors files, embeddings included).
An EoRA rank applies to quantized formats only (the branch corrects quantization error).
For 2:4 + W4 rows with and without EoRA, the table gives the share of the perplexity lost to
2:4 + W4 that the branch wins back.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import subprocess
from pathlib import Path

import torch

import llmcompress
import quant_methods
from llmcompress import PruneConfig


def _label(row: dict) -> str:
    return PruneConfig(**row["prune"]).describe() if row.get("prune") else "float"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured patterns")
    parser.add_argument("--formats", default="16bit,w4g128", help="16bit (pruning alone) and/or quantized formats")
    parser.add_argument("--quant-method", default="gptq", help="quantizer for the quantized formats")
    parser.add_argument("--ranks", default="0,64", help="EoRA ranks for quantized formats")
    parser.add_argument("--no-float", action="store_true", help="skip the float baseline row")
    quant_methods.add_protocol_arguments(parser)
    parser.add_argument("--json", default="eval/results/prune_methods.json")
    args = parser.parse_args()

    common = {**quant_methods.protocol_job(args, args.model), "disk": True}
    jobs = [] if args.no_float else [{**common, "method": "float", "format": "float16"}]
    for fmt in args.formats.split(","):
        ranks = [0] if fmt == "16bit" else [int(r) for r in args.ranks.split(",")]
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                prune = {"method": method, "pattern": pattern, "sparsity": args.sparsity if pattern == "unstructured" else None}
                for rank in ranks:
                    lowrank = {"rank": rank, "method": "eora"} if rank else {}
                    jobs.append({**common, "method": "rtn" if fmt == "16bit" else args.quant_method, "format": fmt,
                                 "prune": prune, "lowrank": lowrank})
    rows = []
    context = multiprocessing.get_context("spawn")
    for number, job in enumerate(jobs, start=1):
        with context.Pool(1) as pool:
            row = pool.apply(quant_methods.run_one, (job,))
        rows.append(row)
        rank = (row.get("lowrank") or {}).get("rank", 0)
        print(f"[{number}/{len(jobs)}] {_label(row):26s} {row['format']:8s} eora {rank:3d}  ppl {row['perplexity']:8.3f}  "
              f"{row['disk_bytes'] / 1e6:7.1f} MB  {row.get('compress_seconds', 0):6.1f} s", flush=True)

    print(f"\n{rows[0]['protocol']}; calibration {args.calib}, {args.nsamples} x {args.seqlen} tokens; "
          f"quantized rows use {args.quant_method}\n")
    print("| pruning | weights | EoRA rank | perplexity | bytes on disk (MB) | layer bits/weight | compress time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        rank = (row.get("lowrank") or {}).get("rank", 0)
        print(f"| {_label(row)} | {row['format']} | {rank} | {row['perplexity']:.3f} | {row['disk_bytes'] / 1e6:.2f} | "
              f"{row.get('bits_per_weight') or 16:.3f} | {row.get('compress_seconds', 0):.1f} |")
    float_row = next((r for r in rows if r["method"] == "float"), None)
    recoveries = _eora_recoveries(rows, float_row)
    if recoveries:
        print("\nEoRA on pruned + quantized layers: share of the lost perplexity won back, (ppl_without - ppl_with) / (ppl_without - ppl_float)")
        for label, rank, value in recoveries:
            print(f"  {label} + {args.formats}: rank {rank}: {value:.2f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"rows": rows, "recoveries": recoveries, "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
               "machine": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "llmcompress": llmcompress.__version__, "commit": commit}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")


def _eora_recoveries(rows: list[dict], float_row: dict | None) -> list[tuple[str, int, float]]:
    if float_row is None:
        return []
    without = {(_label(r), r["format"]): r["perplexity"] for r in rows if r.get("prune") and not (r.get("lowrank") or {}).get("rank")}
    found = []
    for row in rows:
        rank = (row.get("lowrank") or {}).get("rank", 0)
        base = without.get((_label(row), row["format"]))
        if rank and base is not None and base > float_row["perplexity"]:
            found.append((_label(row), rank, (base - row["perplexity"]) / (base - float_row["perplexity"])))
    return found


if __name__ == "__main__":
    main()

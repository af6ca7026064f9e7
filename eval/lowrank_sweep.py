"""Low-rank branches on one model: method x format x rank -> perplexity, extra bits, fitting time.

    python eval/lowrank_sweep.py [--formats w4g128,w3g128] [--methods eora,lorc,svdquant]
        [--ranks 0,8,16,32,64,128] [--quantizer rtn] [--w4a4] [--extra gptq:eora:32,...]

Rank 0 is the quantizer alone (for svdquant: smoothing alone). ``--w4a4`` adds the W4A4 rows of
the first format: no branch and no smoothing, smoothing alone, and SVDQuant at rank 32.
``--extra QUANTIZER:METHOD:RANK`` adds single rows (e.g. GPTQ under EoRA). Every row runs in
its own process on the same calibration windows and evaluation text (see quant_methods.py);
each finished row is appended to the JSON at once, so an interrupted sweep keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path, and so find quant_methods
import quant_methods  # noqa: E402

import llmcompress  # noqa: E402


def _jobs(args: argparse.Namespace) -> list[dict]:
    common = quant_methods.protocol_job(args, args.model)
    ranks = [int(r) for r in args.ranks.split(",")]
    formats = args.formats.split(",")
    jobs = [{**common, "method": "float", "format": "float16", "label": "float16"}]
    for spec in formats:
        if 0 in ranks:
            jobs.append({**common, "method": args.quantizer, "format": spec, "label": f"{args.quantizer} alone"})
        for method in args.methods.split(","):
            for rank in ranks:
                if rank == 0 and method != "svdquant":
                    continue
                jobs.append({**common, "method": args.quantizer, "format": spec, "lowrank": {"rank": rank, "method": method},
                             "label": f"{args.quantizer} + {method} r{rank}" if rank else f"{args.quantizer} + svdquant smoothing only"})
    for extra in filter(None, args.extra.split(",")):
        quantizer, method, rank = extra.split(":")
        for spec in formats:
            jobs.append({**common, "method": quantizer, "format": spec, "lowrank": {"rank": int(rank), "method": method},
                         "label": f"{quantizer} + {method} r{rank}"})
    if args.w4a4:
        spec = formats[0]
        jobs += [
            {**common, "method": "rtn", "format": spec, "act_bits": 4, "label": "W4A4 rtn, no smoothing, no branch"},
            {**common, "method": "rtn", "format": spec, "act_bits": 4, "lowrank": {"rank": 0, "method": "svdquant"},
             "label": "W4A4 rtn + svdquant smoothing only"},
            {**common, "method": "rtn", "format": spec, "act_bits": 4, "lowrank": {"rank": 32, "method": "svdquant"},
             "label": "W4A4 rtn + svdquant r32"},
        ]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--formats", default="w4g128,w3g128")
    parser.add_argument("--methods", default="eora,lorc,svdquant")
    parser.add_argument("--ranks", default="0,8,16,32,64,128")
    parser.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq", "awq", "awq+gptq"])
    parser.add_argument("--extra", default="", help="more rows as QUANTIZER:METHOD:RANK, comma-separated")
    parser.add_argument("--w4a4", action="store_true", help="add the W4A4 rows (no branch, smoothing only, SVDQuant r32)")
    quant_methods.add_protocol_arguments(parser)
    parser.add_argument("--json", default="eval/results/lowrank_sweep.json")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"rows": [], "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
               "machine": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "llmcompress": llmcompress.__version__, "commit": commit}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(args)
    context = multiprocessing.get_context("spawn")
    for number, job in enumerate(jobs, start=1):
        with context.Pool(1) as pool:
            row = {"label": job["label"], "rank": job.get("lowrank", {}).get("rank", 0), "lowrank_method": job.get("lowrank", {}).get("method"),
                   "act_bits": job.get("act_bits"), **pool.apply(quant_methods.run_one, (job,))}
        payload["rows"].append(row)
        out.write_text(json.dumps(payload, indent=2))
        print(f"[{number}/{len(jobs)}] {row['format']:8s} {row['label']:36s} ppl {row['perplexity']:8.3f}  "
              f"{row.get('compress_seconds', 0):7.1f} s", flush=True)

    rows = payload["rows"]
    float_ppl = rows[0]["perplexity"]
    print(f"\n{rows[0]['protocol']}; calibration {args.calib}, {args.nsamples} x {args.seqlen} tokens\n")
    print("| format | configuration | perplexity | recovered vs quantizer alone | bits/weight | of which branch | compress time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    alone = {r["format"]: r["perplexity"] for r in rows if r["label"].endswith("alone")}
    for row in rows[1:]:
        baseline = alone.get(row["format"])
        recovered = ""
        if baseline is not None and baseline > float_ppl and not row["label"].endswith("alone") and not row.get("act_bits"):
            row["recovered"] = (baseline - row["perplexity"]) / (baseline - float_ppl)
            recovered = f"{row['recovered']:.2f}"
        print(f"| {row['format']} | {row['label']} | {row['perplexity']:.3f} | {recovered} | {row['bits_per_weight']:.3f} | "
              f"{row['branch_bits_per_weight']:.3f} | {row['compress_seconds']:.1f} |")
    print(f"| | float16 | {float_ppl:.3f} | | 16 | | |")
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

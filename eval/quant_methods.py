"""Quantization methods side by side on one model: method x format -> perplexity, time, memory.

    python eval/quant_methods.py --methods rtn,gptq,awq --formats w4g128,w4g128s,w3g128 \
        [--model DIR] [--nsamples 128] [--seqlen 512] [--eval-windows 40] [--json FILE]

Formats: wBgG[s] (B bits, group G or -1 for per channel, s = symmetric), nvfp4, mxfp4.
Every configuration runs in its own process (peak RSS is that process's own) on the same
calibration windows (seeded) and the same held-out evaluation text. Uses only the public API.
Prints a Markdown table and writes JSON with the protocol, versions and machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import llmcompress
from llmcompress import CalibConfig, CompressConfig, LowRankConfig, PruneConfig, QuantFormat
from llmcompress.evaluate import perplexity
from llmcompress.models import load_model
from llmcompress.summary import size_summary


def parse_format(spec: str) -> QuantFormat | None:
    """``16bit`` (None: no quantization, for pruning alone), wBgG[s], nvfp4 or mxfp4."""
    if spec == "16bit":
        return None
    if spec in ("nvfp4", "mxfp4"):
        return QuantFormat(kind=spec)
    match = re.fullmatch(r"w(\d)g(-?\d+)(s?)", spec)
    if not match:
        raise SystemExit(f"format {spec!r}: expected wBgG[s] (e.g. w4g128, w3g64s), nvfp4, mxfp4 or 16bit")
    return QuantFormat(bits=int(match[1]), group_size=int(match[2]), symmetric=bool(match[3]))


def run_one(job: dict) -> dict:
    """One configuration in a fresh process: compress, evaluate, report time and peak memory.
    With ``job["disk"]`` the checkpoint is also written, and its bytes on disk reported."""
    torch.manual_seed(0)
    model, tokenizer = load_model(job["model"])
    row = {"method": job["method"], "format": job["format"], "prune": job.get("prune", {}), "lowrank": job.get("lowrank", {})}
    if job["method"] != "float":
        config = CompressConfig(quant=parse_format(job["format"]), method=job["method"],
                                calib=CalibConfig(source=job["calib"], nsamples=job["nsamples"], seqlen=job["seqlen"]),
                                lowrank=LowRankConfig(**job.get("lowrank", {})), act_bits=job.get("act_bits"),
                                prune=PruneConfig(**job.get("prune", {})))
        started = time.perf_counter()
        llmcompress.compress(model, config, calibration=job["calib"] if config.needs_calibration else None, tokenizer=tokenizer, progress=False)
        row["compress_seconds"] = time.perf_counter() - started
        size = size_summary(model)
        row.update(bits_per_weight=size.layer_bits_per_weight, branch_bits_per_weight=size.branch_bits_per_weight,
                   compute_dtype=model.compression_report.compute_dtype)
        layers = model.compression_report.layers
        errors = [r.output_error for r in layers if r.output_error is not None]
        row["mean_layer_output_error"] = sum(errors) / len(errors) if errors else None
    if job.get("disk"):
        with tempfile.TemporaryDirectory() as scratch:
            written = Path(scratch) / "model"
            if job["method"] == "float":
                model.save_pretrained(written)
            else:
                llmcompress.checkpoint.save(model, written, model.llmcompress_config)
            row["disk_bytes"] = sum(f.stat().st_size for f in written.glob("*.safetensors"))
    result = perplexity(model, tokenizer, job["text"], seqlen=job["eval_seqlen"], max_windows=job["eval_windows"], progress=False)
    row.update(perplexity=result.perplexity, protocol=result.protocol,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Calibration and evaluation settings, shared by every program that compares methods."""
    parser.add_argument("--calib", default="austen:train")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--text", default="austen:test")
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=40)


def protocol_job(args: argparse.Namespace, model: str | None) -> dict:
    """The fields of a ``run_one`` job that the protocol arguments fix."""
    return {"model": model, "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "text": args.text,
            "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows or None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--formats", default="w4g128,w4g128s,w3g128")
    add_protocol_arguments(parser)
    parser.add_argument("--json", default="eval/results/quant_methods.json")
    args = parser.parse_args()

    common = protocol_job(args, args.model)
    jobs = [{**common, "method": "float", "format": "float16"}]
    jobs += [{**common, "method": m, "format": f} for f in args.formats.split(",") for m in args.methods.split(",")]
    rows = []
    context = multiprocessing.get_context("spawn")
    for number, job in enumerate(jobs, start=1):
        with context.Pool(1) as pool:
            row = pool.apply(run_one, (job,))
        rows.append(row)
        print(f"[{number}/{len(jobs)}] {row['method']:9s} {row['format']:9s} ppl {row['perplexity']:8.3f}  "
              f"{row.get('compress_seconds', 0):7.1f} s  {row['peak_rss_mb']:7.0f} MB", flush=True)

    float_ppl = rows[0]["perplexity"]
    rtn = {r["format"]: r["perplexity"] for r in rows if r["method"] == "rtn"}
    print(f"\n{rows[0]['protocol']}; calibration {args.calib}, {args.nsamples} x {args.seqlen} tokens\n")
    print("| method | format | perplexity | vs float | recovered vs RTN | compress time (s) | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        baseline = rtn.get(row["format"])
        recovered = ""
        if baseline is not None and row["method"] not in ("rtn", "float") and baseline > float_ppl:
            row["recovered_vs_rtn"] = (baseline - row["perplexity"]) / (baseline - float_ppl)
            recovered = f"{row['recovered_vs_rtn']:.2f}"
        print(f"| {row['method']} | {row['format']} | {row['perplexity']:.3f} | {row['perplexity'] / float_ppl:.3f}x | {recovered} | "
              f"{row.get('compress_seconds', 0):.1f} | {row['peak_rss_mb']:.0f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"rows": rows, "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
               "machine": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "llmcompress": llmcompress.__version__, "commit": commit}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""Compression time of one configuration at two revisions of llmcompress, side by side in one run
(these machines are noisy, so the trees take turns): by default GPTQ W4 g128 on the bundled
SmolLM2, at the commit before the pass/recipe refactor and at the working tree.

    python eval/bench_refactor.py [--before REV] [--rounds 3] [--nsamples 32] [--seqlen 512] [--json FILE]

Each measurement is a fresh process that loads the model, tokenises the calibration text, and
times ``llmcompress.compress`` alone (no evaluation, no writing). Prints a Markdown table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "cc63ee6"  # the last commit before the pass/recipe refactor

MEASURE = r'''
import sys, time, json, torch
import llmcompress
from llmcompress.calib import calibration_windows
from llmcompress.config import CalibConfig, CompressConfig, QuantFormat
from llmcompress.models import load_model
nsamples, seqlen = int(sys.argv[1]), int(sys.argv[2])
model, tokenizer = load_model(None)
model = model.to(torch.float32)
windows = calibration_windows("austen:train", tokenizer, nsamples, seqlen, 0)
config = CompressConfig(quant=QuantFormat(bits=4, group_size=128), method="gptq", calib=CalibConfig(nsamples=nsamples, seqlen=seqlen))
started = time.perf_counter()
llmcompress.compress(model, config, calibration=windows, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started}))
'''


def measure(tree: Path, nsamples: int, seqlen: int) -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(nsamples), str(seqlen)], cwd=tree, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"measuring {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path, default=REPO / "eval" / "results" / "bench_refactor.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True, capture_output=True)
        try:
            times: dict[str, list[float]] = {"before": [], "after": []}
            for round_number in range(args.rounds):
                order = [("before", before), ("after", REPO)] if round_number % 2 == 0 else [("after", REPO), ("before", before)]
                for name, tree in order:
                    times[name].append(measure(tree, args.nsamples, args.seqlen))
                    print(f"round {round_number + 1}: {name} {times[name][-1]:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False, capture_output=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nGPTQ W4 g128 asym (act-order, static groups, range search) on SmolLM2-135M, float32, "
          f"{args.nsamples} x {args.seqlen} calibration tokens, {platform.processor() or platform.machine()}\n")
    print("| tree | runs (s) | median (s) |\n|---|---|---:|")
    for name, values in times.items():
        label = f"before ({args.before})" if name == "before" else "after (working tree)"
        print(f"| {label} | {', '.join(f'{v:.1f}' for v in values)} | {medians[name]:.1f} |")
    print(f"\nafter / before = {medians['after'] / medians['before']:.3f}")
    args.json.write_text(json.dumps({"before_revision": args.before, "nsamples": args.nsamples, "seqlen": args.seqlen, "seconds": times,
                                     "median": medians, "ratio": medians["after"] / medians["before"]}, indent=2) + "\n")
    print(f"wrote: {args.json}")


if __name__ == "__main__":
    main()

"""How long one compression takes in one process and in two under torchrun (gloo on the CPU),
measured in one run, and whether the checkpoints are the same bytes.

    python eval/distributed_time.py [--model DIR] [--json FILE] [-- EXTRA COMPRESS OPTIONS]

Three runs of the same command (default: GPTQ INT4 g128 of the bundled SmolLM2 on 16 windows
of 256 tokens, one window per micro-batch, no evaluation): one process with one thread, one
process with every thread (what a plain `compress` uses), and `torchrun --nproc-per-node 2`
(torchrun gives each process one thread); --no-all-threads skips the second. The two-process checkpoint is compared byte for byte
with the one-thread single-process one: CPU matmuls may round differently at other thread counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcompress.models import default_model_dir

OPTIONS = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", "austen:train", "--nsamples", "16", "--seqlen", "256",
           "--batch-size", "1", "--no-eval"]


def timed_run(launcher: list[str], threads: int | None, model: str, options: list[str], out: Path) -> float:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [*launcher, "-m", "llmcompress", model, *options, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def same_tensors(one: Path, two: Path) -> bool:
    files = sorted(p.name for p in one.glob("*.safetensors"))
    return bool(files) and files == sorted(p.name for p in two.glob("*.safetensors")) and all(
        (one / f).read_bytes() == (two / f).read_bytes() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory [default: the bundled SmolLM2-135M]")
    parser.add_argument("--json", default="eval/results/distributed_time.json")
    parser.add_argument("--no-all-threads", action="store_true",
                        help="skip the single process at every thread (a machine busy with other work oversubscribes its cores)")
    parser.add_argument("extra", nargs="*", help="compress options replacing the default ones")
    args = parser.parse_args()
    model = args.model or str(default_model_dir())
    options = (args.extra + ["--no-eval"]) if args.extra else OPTIONS
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    runs = [("1 process, 1 thread", python, 1), (f"1 process, {torch.get_num_threads()} threads", python, None),
            ("2 processes (torchrun, gloo), 1 thread each", torchrun, None)]
    if args.no_all_threads:
        del runs[1]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for index, (label, launcher, threads) in enumerate(runs):
            seconds = timed_run(launcher, threads, model, options, Path(work) / str(index))
            rows.append({"run": label, "seconds": round(seconds, 1)})
            print(f"{label:45s} {seconds:8.1f} s", flush=True)
        identical = same_tensors(Path(work) / "0", Path(work) / str(len(runs) - 1))
    print(f"two-process checkpoint {'byte-identical to' if identical else 'DIFFERS from'} the one-thread single-process one")
    record = {"model": model, "options": options, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "torch": torch.__version__, "runs": rows, "byte_identical": identical,
              "command": "torchrun --standalone --nproc-per-node 2 -m llmcompress MODEL " + " ".join(options)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote: {args.json}")


if __name__ == "__main__":
    main()

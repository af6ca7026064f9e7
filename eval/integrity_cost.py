"""What checking a checkpoint against its checksums costs: the bundled SmolLM2 compressed to
INT4 g128 with RTN, verified alone (what `compress verify` does) and loaded with and without
the check (`llmcompress.load(..., verify=False)`, `--no-verify`).

    python eval/integrity_cost.py [--workdir DIR] [--repeats 5] [--json FILE]

Each time is the median of --repeats runs, twice: with the checkpoint's files in the page cache,
and with them dropped from it first (``posix_fadvise(DONTNEED)``, which needs no privileges), so
that the check and the load read the disk. Also prints how fast this CPU hashes bytes already in
memory with SHA-256 (what the record uses) and BLAKE2b.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import llmcompress
from llmcompress import integrity

RECIPE = {"passes": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 128}}]}
HASH_BYTES = 256 * 1024**2


def hash_speed(algorithm: str) -> float:
    """GB/s of ``algorithm`` over bytes in memory, fed in the chunks the record is written with."""
    data = memoryview(os.urandom(HASH_BYTES))
    chunk = 8 * 1024**2
    started = time.perf_counter()
    digest = hashlib.new(algorithm)
    for offset in range(0, HASH_BYTES, chunk):
        digest.update(data[offset: offset + chunk])
    return HASH_BYTES / (time.perf_counter() - started) / 1e9


def drop_from_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def median_seconds(action: Callable[[], object], repeats: int, cold: Path | None) -> float:
    times = []
    for _ in range(repeats):
        if cold is not None:
            drop_from_page_cache(cold)
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoint is written [default: a temporary directory].")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.workdir or Path(scratch)) / "smollm2-w4g128-rtn"
        llmcompress.compress(None, RECIPE, output_dir=out, overwrite=True, progress=False)
        megabytes = sum(entry["bytes"] for entry in integrity.read_record(out).values()) / 1e6
        actions = {
            "verify": lambda: integrity.verify(out),
            "load, verify=False": lambda: llmcompress.load(out, verify=False),
            "load, verify=True": lambda: llmcompress.load(out),
        }
        llmcompress.load(out)  # imports and first-call costs are not what is measured
        rows = {name: {"warm_s": median_seconds(action, args.repeats, None), "cold_s": median_seconds(action, args.repeats, out)}
                for name, action in actions.items()}
    speeds = {name: hash_speed(name) for name in ("sha256", "blake2b")}
    print(f"SmolLM2-135M INT4 g128 (RTN) checkpoint: {megabytes:.1f} MB recorded; {torch.get_num_threads()} torch threads; "
          f"median of {args.repeats}")
    print(f"{'':22}  {'page cache':>10}  {'from disk':>10}")
    for name, row in rows.items():
        print(f"{name:22}  {row['warm_s']:>9.3f}s  {row['cold_s']:>9.3f}s")
    for when in ("warm_s", "cold_s"):
        extra = rows["load, verify=True"][when] - rows["load, verify=False"][when]
        print(f"the check adds {extra:.3f} s ({extra / rows['load, verify=False'][when]:+.0%}) to a load "
              f"{'from the page cache' if when == 'warm_s' else 'from disk'}")
    print("hashing bytes in memory: " + ", ".join(f"{name} {speed:.2f} GB/s" for name, speed in speeds.items()))
    if args.json:
        args.json.write_text(json.dumps({"megabytes": megabytes, "repeats": args.repeats, "threads": torch.get_num_threads(),
                                         "cpu": platform.processor() or platform.machine(), "times": rows, "hash_gb_per_s": speeds}, indent=2))


if __name__ == "__main__":
    main()

"""Time the fused 4-bit + low-rank kernels against FP16 torch.matmul and the unfused path.

    python eval/bench_kernels.py [--json eval/results/bench_kernels_h100.json] [--quick]

For each (N, K), tokens M and rank r it reports microseconds (CUDA events around replays of
a CUDA graph of many calls, median of many replays, each call reading the next of several
copies of the weights so that the working set exceeds the L2 cache), achieved GB/s over the
bytes the call must move, that as a percent of the measured device-to-device copy bandwidth,
and the speedups over FP16 and over the unfused path (our kernel at rank 0 plus two separate
low-rank matmuls). ``int4`` is INT4 g128 asymmetric, ``nvfp4`` is NVFP4 (E4M3 per 16 +
global). Their columns time the path ``launch.linear`` dispatches to; above the source's
``fused_max_m`` tokens the JSON also holds the time of every path this source and GPU have
(``paths``): the fused kernel, the tiled kernel where the source's families include "gemm", the
wgmma kernel where they include "wgmma" and the GPU is Hopper (sm_90), and dequantize + cuBLAS.

It times the kernel source that ``LLMCOMPRESS_KERNEL`` selects (``default`` or ``tiled``,
kernels/README.md), recorded in the JSON as "kernel"; run it once under each value, on the
same GPU, to compare them (eval/tools/gpu_session.sh does). Every timing in one table comes
from one run on one GPU. Needs a CUDA GPU and CuPy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from dataclasses import replace
from pathlib import Path

import torch

from llmcompress.config import QuantFormat
from llmcompress.cuda import launch
from llmcompress.errors import ConfigError
from llmcompress.cuda.prepack import Prepacked, prepack
from llmcompress.formats import quantize
from llmcompress.packing import LayerLayout, pack_branch, pack_weight

SHAPES = [(4096, 4096), (8192, 8192), (11008, 4096), (4096, 11008), (28672, 8192)]
TOKENS = [1, 16, 64, 256]
RANKS = [0, 32, 64]
FORMATS = {"int4": QuantFormat(bits=4, group_size=128), "nvfp4": QuantFormat(kind="nvfp4")}
# Each timed call reads the next copy of the weights; copies together exceed this many bytes
# (several times the 50 MB L2 of an H100).
ROTATION_BYTES = 256 * 2**20
REPLAYS = 25


def paths(source: launch.KernelSource, capability: tuple[int, int]) -> dict:
    """Each path ``source``'s dispatch can take on a GPU of ``capability``, named as ``launch.path``
    names it (dequantize + cuBLAS as "dequant"), each callable on any token count as
    ``call(x, pk, bias, ...)``."""
    routes = {"fused": launch.fused_linear}
    if "gemm" in source.families:
        routes["tiled"] = launch.tiled_linear
    if "wgmma" in source.families and capability == launch.WGMMA_CAPABILITY:
        routes["wgmma"] = launch.wgmma_linear
    routes["dequant"] = launch.dequantized_linear
    return routes


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (median of 20)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() / statistics.median(times[2:])


def time_calls(calls: list, replays: int = REPLAYS) -> float:
    """Median microseconds per call: a CUDA graph replays the calls in turn."""
    for call in calls:  # warm-up: compiles, allocates the workspace counters
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def packed_layer(fmt: QuantFormat, out_features: int, in_features: int, rank: int, dtype: torch.dtype) -> Prepacked:
    weight = torch.randn(out_features, in_features, device="cuda") * 0.02
    tensors = pack_weight(quantize(weight, fmt), fmt)
    if rank:
        tensors.update(pack_branch(torch.randn(rank, in_features, device="cuda") * 0.02,
                                   torch.randn(out_features, rank, device="cuda") * 0.02, "float16"))
    return prepack(tensors, fmt, in_features, LayerLayout(rank=rank), dtype)


def copies_of(pk: Prepacked, count: int) -> list[Prepacked]:
    tensors = ("qweight", "records", "lowrank_a", "lowrank_b")
    return [pk] + [replace(pk, **{name: getattr(pk, name).clone() for name in tensors if getattr(pk, name) is not None})
                   for _ in range(count - 1)]


def layer_bytes(pk: Prepacked) -> int:
    tensors = (pk.qweight, pk.records, pk.lowrank_a, pk.lowrank_b)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rotated_copies(pk: Prepacked, at_least: int = 2) -> list[Prepacked]:
    """Enough copies of the layer to exceed the L2 cache when read in turn."""
    return copies_of(pk, max(at_least, -(-ROTATION_BYTES // layer_bytes(pk))))


def rotated_dense(out_features: int, in_features: int) -> list[torch.Tensor]:
    """The FP16 baseline's weight, copied likewise."""
    dense = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16) * 0.02
    return [dense] + [dense.clone() for _ in range(max(1, ROTATION_BYTES // dense.nbytes))]


def time_fp16(x: torch.Tensor, dense_copies: list[torch.Tensor]) -> float:
    return time_calls([lambda w=w: torch.matmul(x, w.T) for w in dense_copies])


def time_layer(call, x: torch.Tensor, copies: list[Prepacked], **options) -> float:  # noqa: ANN001 - a launch function
    """Microseconds of ``call(x, layer, None, **options)``, each call on the next copy."""
    return time_calls([lambda pk=pk: call(x, pk, None, **options) for pk in copies])


def bench_shape(out_features: int, in_features: int, tokens_list: list[int], ranks: list[int], bandwidth: float) -> list[dict]:
    dtype = torch.float16
    source, capability = launch.selected(), torch.cuda.get_device_capability()
    rows = []
    dense_copies = rotated_dense(out_features, in_features)
    layers = {}
    for name, fmt in FORMATS.items():
        for rank in ranks:
            pk = packed_layer(fmt, out_features, in_features, rank, dtype)
            layers[name, rank] = rotated_copies(pk)
    for tokens in tokens_list:
        x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
        fp16_us = time_fp16(x, dense_copies)
        for rank in ranks:
            row = {"N": out_features, "K": in_features, "M": tokens, "rank": rank, "fp16_us": fp16_us}
            for name in FORMATS:
                copies = layers[name, rank]
                row[f"{name}_us"] = time_layer(launch.linear, x, copies)
                row[f"{name}_path"] = launch.path(tokens, capability, source)
                if tokens > source.fused_max_m:  # every path, to check the dispatch
                    for route, call in paths(source, capability).items():
                        row[f"{name}_{route}_us"] = time_layer(call, x, copies)
                moved = layer_bytes(copies[0]) + 2 * tokens * (in_features + out_features)
                row[f"{name}_gbps"] = moved / row[f"{name}_us"] / 1e3
                row[f"{name}_pct_copy_bw"] = 100 * moved / (row[f"{name}_us"] * 1e-6) / bandwidth
                row[f"{name}_speedup_fp16"] = fp16_us / row[f"{name}_us"]
            if rank:
                base = layers["int4", 0]
                branches = layers["int4", rank]
                row["unfused_us"] = time_calls([
                    lambda pk=pk, br=br: launch.linear(x, pk, None) + (x @ br.lowrank_a[:rank].T) @ br.lowrank_b[:out_features, :rank].T
                    for pk, br in zip(base, branches, strict=False)])
                row["fused_over_unfused"] = row["unfused_us"] / row["int4_us"]
                row["branch_overhead_pct"] = 100 * (row["int4_us"] / next(
                    r["int4_us"] for r in rows if r["M"] == tokens and r["rank"] == 0 and r["N"] == out_features
                    and r["K"] == in_features) - 1) if 0 in ranks else None
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = (f"{'N x K':>12} {'M':>4} {'r':>3} | {'fp16 us':>8} {'int4 us':>8} {'GB/s':>6} {'%bw':>5} {'x fp16':>6} "
          f"{'+br %':>6} {'unfused':>8} {'x unf':>6} | {'nvfp4 us':>8} {'fp4/int4':>8}")


def format_row(row: dict) -> str:
    def num(key: str, width: int, digits: int = 1) -> str:
        value = row.get(key)
        return f"{value:>{width}.{digits}f}" if isinstance(value, float) else f"{'-':>{width}}"

    return (f"{row['N']:>5} x {row['K']:<5} {row['M']:>4} {row['rank']:>3} | {num('fp16_us', 8)} {num('int4_us', 8)} "
            f"{num('int4_gbps', 6, 0)} {num('int4_pct_copy_bw', 5, 0)} {num('int4_speedup_fp16', 6, 2)} "
            f"{num('branch_overhead_pct', 6)} {num('unfused_us', 8)} {num('fused_over_unfused', 6, 2)} | "
            f"{num('nvfp4_us', 8)} {row['nvfp4_us'] / row['int4_us']:>8.2f}")


def sweep_splits(out_features: int, in_features: int) -> list[dict]:
    """Time the fused kernel at each split-K count (to set launch.fused_plan's heuristic)."""
    copies = rotated_copies(packed_layer(FORMATS["int4"], out_features, in_features, 32, torch.float16), at_least=8)
    rows = []
    for tokens in (1, 16, 64):
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
        default = launch.device_plan(copies[0], tokens)["splits"]
        timings = {splits: time_layer(launch.fused_linear, x, copies, splits=splits)
                   for splits in (1, 2, 3, 4, 6, 8, 12, 16)}
        print(f"splits sweep {out_features}x{in_features} M={tokens} (default {default}): "
              + " ".join(f"{k}:{v:.1f}" for k, v in timings.items()), flush=True)
        rows.append({"N": out_features, "K": in_features, "M": tokens, "rank": 32, "default_splits": default,
                     "us_by_splits": timings})
    return rows


def sweep_dispatch(out_features: int, in_features: int) -> list[dict]:
    """Time every path at rank 32 for token counts from 16 to 2048, beside FP16: the data for the
    selected source's fused_max_m and tiled_max_m (launch.SOURCES). The fused kernel is timed up
    to 256 tokens; the tiled and wgmma kernels, where the source and GPU have them, at every count."""
    source, capability = launch.selected(), torch.cuda.get_device_capability()
    routes = paths(source, capability)
    dense_copies = rotated_dense(out_features, in_features)
    copies = rotated_copies(packed_layer(FORMATS["int4"], out_features, in_features, 32, torch.float16), at_least=8)
    rows = []
    for tokens in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048):
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
        row = {"N": out_features, "K": in_features, "M": tokens, "rank": 32, "path": launch.path(tokens, capability, source),
               "fp16_us": time_fp16(x, dense_copies)}
        for route, call in routes.items():
            if route != "fused" or tokens <= 256:
                row[f"{route}_us"] = time_layer(call, x, copies)
        print(f"dispatch sweep {out_features}x{in_features} r=32 M={tokens} (takes {row['path']}): "
              + " ".join(f"{k}:{v:.1f}" for k, v in row.items() if k.endswith("_us")), flush=True)
        rows.append(row)
    return rows


def sweep_branch(out_features: int, in_features: int) -> list[dict]:
    """Time rank 32 at each (split count, branch item count) around the plan's choice, beside
    rank 0: the data for launch.fused_plan's branch rule ("fewer splits and small items" against
    "the same splits and large items", docs/decisions/0002)."""
    base = rotated_copies(packed_layer(FORMATS["int4"], out_features, in_features, 0, torch.float16), at_least=8)
    copies = rotated_copies(packed_layer(FORMATS["int4"], out_features, in_features, 32, torch.float16), at_least=8)
    rows = []
    for tokens in (1, 16):
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
        plan = launch.device_plan(copies[0], tokens)
        rank0_us = time_layer(launch.fused_linear, x, base)
        timings = {}
        for splits in sorted({max(1, plan["splits"] - 1), plan["splits"]}):
            for items in (2, 4, 8, 16, 32, 64):
                timings[f"{splits}/{items}"] = time_layer(launch.fused_linear, x, copies, splits=splits, branch_items=items)
        print(f"branch sweep {out_features}x{in_features} r=32 M={tokens} splits/items (rank 0: {rank0_us:.1f}, default "
              f"{plan['splits']}/{plan['branch_items']}): " + " ".join(f"{k}:{v:.1f}" for k, v in timings.items()), flush=True)
        rows.append({"N": out_features, "K": in_features, "M": tokens, "rank": 32, "rank0_us": rank0_us,
                     "default": f"{plan['splits']}/{plan['branch_items']}", "us_by_splits_items": timings})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="eval/results/bench_kernels.json")
    parser.add_argument("--quick", action="store_true", help="8192 x 8192 only")
    parser.add_argument("--sweep-splits", action="store_true", help="also time every split-K count at 8192^2 and 4096^2")
    parser.add_argument("--sweep-branch", action="store_true",
                        help="also time rank 32 at each (splits, branch items) at 4096 x 11008, 8192^2 and 4096^2")
    parser.add_argument("--sweep-dispatch", action="store_true",
                        help="also time every path at rank 32 for M = 16..2048 at 8192^2 and 4096 x 11008")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args()
    try:
        source = launch.selected()
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    launch.check_cupy(source)
    capability = torch.cuda.get_device_capability()
    bandwidth = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} (sm_{capability[0]}{capability[1]}): measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print(f"{launch.KERNEL_ENV}={source.name} ({source.filename}): paths {', '.join(paths(source, capability))}; "
          f"fused up to {source.fused_max_m} tokens, dequant+cuBLAS above {source.tiled_max_m}")
    sweeps = {}
    if args.sweep_splits:
        sweeps["splits"] = sweep_splits(8192, 8192) + sweep_splits(4096, 4096)
    if args.sweep_branch:
        sweeps["branch"] = sweep_branch(4096, 11008) + sweep_branch(8192, 8192) + sweep_branch(4096, 4096)
    if args.sweep_dispatch:
        sweeps["dispatch"] = sweep_dispatch(8192, 8192) + sweep_dispatch(4096, 11008)
    print(HEADER)
    rows = []
    for out_features, in_features in ([(8192, 8192)] if args.quick else SHAPES):
        rows += bench_shape(out_features, in_features, TOKENS, RANKS, bandwidth)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                            check=False).stdout.strip()
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    result = {"gpu": props.name, "capability": list(capability), "driver": driver, "commit": commit,
              "kernel": source.name, "kernel_file": source.filename, "torch": torch.__version__, "python": platform.python_version(),
              "copy_bandwidth_gbps": bandwidth / 1e9, "int4_format": FORMATS["int4"].describe(), "dtype": "float16", "rows": rows, "sweeps": sweeps}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

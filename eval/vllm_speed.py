"""Serving speed in vLLM: decode tokens/s of our exports against the float model, on one machine in one run.

    python eval/vllm_speed.py [--vllm-python /tmp/vllmvenv/bin/python] [--configs float,w4g64s,w4g64,w4g64s-gptq]
        [--batch-sizes 1,8] [--prompt-tokens 64] [--max-tokens 128] [--repeats 3] [--cpus 0-1]
        [--json eval/results/vllm_speed.json]

The bundled SmolLM2 is saved in bfloat16 (the float row) and compressed in memory with RTN INT4
g64 into each export (compressed-tensors symmetric and asymmetric, GPTQ; and, only when named in
``--configs``, ``w4g64s-lorc32``: compressed-tensors with a LoRC rank-32 branch served as a LoRA
adapter through a ``LoRARequest``, which vLLM's CPU build runs very slowly). Each is served by
``vllm.LLM(dtype="bfloat16", enforce_eager=True)`` in a child process under vLLM's own
interpreter (``--vllm-python`` or ``$LLMCOMPRESS_VLLM_PYTHON``, as ``llmcompress.export.vllm``),
twice: with ``VLLM_CPU_INT4_W4A8=0`` (INT4 weights against bfloat16 activations, W4A16) and
``=1`` (vLLM quantizes the activations to INT8, W4A8, but only on CPUs with AMX: elsewhere both
settings run the same kernel, which the table says, naming the kernel each layer got).

Each batch of ``--batch-sizes`` distinct prompts of ``--prompt-tokens`` tokens (windows of the
evaluation text) generates ``--max-tokens`` tokens per prompt (greedy, EOS ignored), after one
warm-up per batch size. Decode tokens/s is batch x (max_tokens - 1) over vLLM's own decode time
(its last token's timestamp minus its first's, as vLLM's metrics compute it); time to first token
is the first token's timestamp after the call; end-to-end counts every token over the call's wall
time. Each is the median of ``--repeats`` runs; spread is (max - min) / median of decode tokens/s.
The best decode tokens/s (of the repeats) is given too: on a shared machine another process
slows some runs by 10x and more, and the load average before and after is recorded. The ratios
are to the float model at the same batch size, in the same run, median to median and best to best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import llmcompress
from llmcompress.calib import DEFAULT_EVALUATION, read_text, tokenize
from llmcompress.export import export
from llmcompress.export.vllm import run_in_vllm, vllm_environment, vllm_python, vllm_version
from llmcompress.models import load_model, load_tokenizer, resolve_model_dir

DTYPE = "bfloat16"
W4A8_VARIABLE = "VLLM_CPU_INT4_W4A8"
# The activation paths of vLLM's CPU INT4 kernel, by the value of its switch.
PATHS = {"W4A16": "0", "W4A8": "1"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
WARMUP_TOKENS = 8
INT4 = {"method": "rtn", "bits": 4, "group_size": 64}


@dataclass(frozen=True)
class Config:
    """One model to serve: the float model when ``passes`` is empty, else an export of these passes."""

    description: str
    passes: tuple[dict, ...] = ()
    format: str = "compressed-tensors"
    adapter: bool = False


CONFIGS = {
    "float": Config("float (bfloat16)"),
    "w4g64s": Config("RTN INT4 g64 sym, compressed-tensors", ({"quantize": {**INT4, "symmetric": True}},)),
    "w4g64": Config("RTN INT4 g64 asym, compressed-tensors", ({"quantize": {**INT4, "symmetric": False}},)),
    "w4g64s-gptq": Config("RTN INT4 g64 sym, GPTQ format", ({"quantize": {**INT4, "symmetric": True}},), format="gptq"),
    "w4g64s-lorc32": Config("RTN INT4 g64 sym + LoRC r32, compressed-tensors + LoRA adapter",
                            ({"quantize": {**INT4, "symmetric": True}}, {"lowrank": {"method": "lorc", "rank": 32}}), adapter=True),
}

# The LoRA row is left out by default, for time: vLLM's CPU build applies an adapter with its
# PyTorch fallback ops (a gather and an einsum per layer, token and projection), which took several
# times the INT4 matmuls' time in a profile on 2 cores, and would take this run past 10 minutes.
DEFAULT_CONFIGS = ("float", "w4g64s", "w4g64", "w4g64s-gptq")

_CHILD = r"""
import json, statistics, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.linear import LinearBase

directory, request_file, result_file = sys.argv[1:4]
with open(request_file) as f:
    request = json.load(f)
options, lora = {}, None
if request["adapter"]:
    with open(directory + "/adapter/adapter_config.json") as f:
        config = json.load(f)
    options = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max([config["r"], *config.get("rank_pattern", {}).values()])}
    lora = LoRARequest("adapter", 1, directory + "/adapter")
started = time.monotonic()
# disable_log_stats=False: each output then carries vLLM's per-request timestamps (RequestOutput.metrics).
llm = LLM(model=directory, dtype=request["dtype"], max_model_len=request["max_model_len"], enforce_eager=True,
          enable_prefix_caching=False, seed=0, disable_log_stats=False, max_num_seqs=max(request["batch_sizes"]), **options)
load_seconds = time.monotonic() - started


def kernels(model):
    # The Linear layers' kernels as vLLM chose them at load time (a LoRA wrapper is no LinearBase: its base layer is).
    found = set()
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        method = module.quant_method
        kernel = getattr(getattr(module, "scheme", None), "kernel", None) or getattr(method, "kernel", None)
        name = type(kernel or method).__name__
        if hasattr(module, "use_w4a8"):
            name += " W4A8" if module.use_w4a8 else f" W4A16 isa={module.isa_hint}"
        found.add(name)
    return sorted(found)


def generate(batch, max_tokens):
    prompts = [TokensPrompt(prompt_token_ids=window) for window in request["prompts"][:batch]]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    started = time.monotonic()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    wall = time.monotonic() - started
    if any(len(output.outputs[0].token_ids) != max_tokens for output in outputs):
        raise RuntimeError(f"vLLM generated other than {max_tokens} tokens per prompt")
    first = max(output.metrics.first_token_ts for output in outputs)
    last = max(output.metrics.last_token_ts for output in outputs)
    return {"wall_s": wall, "ttft_s": first - started, "decode_s": last - first}


runs = {}
for batch in request["batch_sizes"]:
    generate(batch, min(request["warmup_tokens"], request["max_tokens"]))
    runs[batch] = [generate(batch, request["max_tokens"]) for _ in range(request["repeats"])]
with open(result_file, "w") as f:
    json.dump({"runs": runs, "kernels": llm.apply_model(kernels)[0], "load_s": load_seconds,
               "torch": sys.modules["torch"].__version__, "llmcompress_imported": "llmcompress" in sys.modules}, f)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="the python of a virtual environment with vLLM's CPU build (else $LLMCOMPRESS_VLLM_PYTHON)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", help="VLLM_CPU_OMP_THREADS_BIND for the children, e.g. 0-1 or 0 (default: vLLM's, auto)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed to each child (load and every run)")
    parser.add_argument("--json", default="eval/results/vllm_speed.json")
    args = parser.parse_args()
    names = set(args.configs.split(","))
    if names - set(CONFIGS):
        parser.error(f"unknown configs {', '.join(sorted(names - set(CONFIGS)))}: choose from {', '.join(CONFIGS)}")
    if "float" not in names:
        parser.error("the ratios need the float model: keep float in --configs")
    # In CONFIGS' order, the float model first: every later row's ratio has its denominator.
    args.configs = [name for name in CONFIGS if name in names]
    if args.max_tokens < 2 or args.repeats < 1:
        parser.error("decode needs --max-tokens 2 or more and --repeats 1 or more")
    return args


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the flags that decide vLLM's CPU kernels (AMX: W4A8 and the amx ISA)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "logical_cpus": os.cpu_count(),
            "flags": {flag: flag in flags for flag in CPU_FLAGS}, "amx": any(flag.startswith("amx") for flag in flags)}


def build(config: Config, out: Path) -> Path:
    """Write the float model (bfloat16) or the export of ``config``, each from a fresh load (compress works in place)."""
    model, tokenizer = load_model(None)
    if not config.passes:
        model.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
    llmcompress.compress(model, {"passes": list(config.passes)}, calibration="none", progress=False)
    return export(model, out, format=config.format, tokenizer=tokenizer)


def prompt_windows(count: int, length: int) -> list[list[int]]:
    """``count`` distinct prompts of ``length`` tokens: consecutive windows of the evaluation text."""
    tokens = tokenize(read_text(DEFAULT_EVALUATION), load_tokenizer(resolve_model_dir(None)))
    return tokens[: count * length].reshape(count, length).tolist()


def settings(path: str | None, cpus: str | None) -> dict[str, str]:
    """What this run changes of vLLM's settings (``llmcompress.export.vllm``): the W4A8 switch for ``path``, the cores."""
    changed = {} if path is None else {W4A8_VARIABLE: PATHS[path]}
    return changed if cpus is None else {**changed, "VLLM_CPU_OMP_THREADS_BIND": cpus}


def summarize(runs: list[dict], batch: int, max_tokens: int) -> dict[str, float]:
    """Medians over the repeats of one batch size, and the best decode speed: on a shared machine
    another process slows a run down (by 10x and more on 2 cores) and never speeds it up."""
    decode = [batch * (max_tokens - 1) / run["decode_s"] for run in runs]
    median = statistics.median(decode)
    return {"decode_tok_s": median, "best_decode_tok_s": max(decode), "ttft_ms": 1000 * statistics.median(run["ttft_s"] for run in runs),
            "end_to_end_tok_s": statistics.median(batch * max_tokens / run["wall_s"] for run in runs),
            "spread": (max(decode) - min(decode)) / median}


def kernel_label(kernels: list[str], path: str | None, amx: bool) -> str:
    label = ", ".join(kernels)
    if path == "W4A8" and not amx:
        label += " (no AMX: W4A8 setting has no effect)"
    return label


def rows_of(name: str, config: Config, path: str | None, result: dict, args: argparse.Namespace, amx: bool) -> list[dict]:
    return [{"config": name, "export": config.description, "path": path or DTYPE, "adapter": config.adapter,
             "w4a8_in_effect": any(kernel.endswith(" W4A8") for kernel in result["kernels"]),
             "kernel": kernel_label(result["kernels"], path, amx) + (" + LoRA" if config.adapter else ""), "batch": int(batch),
             "load_s": result["load_s"], **summarize(runs, int(batch), args.max_tokens), "runs": runs}
            for batch, runs in result["runs"].items()]


def add_ratios(rows: list[dict]) -> None:
    """Each row's decode tokens/s over the float model's at the same batch size."""
    floats = {row["batch"]: row for row in rows if row["config"] == "float"}
    for row in rows:
        row["ratio_to_float"] = row["decode_tok_s"] / floats[row["batch"]]["decode_tok_s"]
        row["best_ratio_to_float"] = row["best_decode_tok_s"] / floats[row["batch"]]["best_decode_tok_s"]


def table(rows: list[dict]) -> str:
    lines = ["| export | path | kernel | batch | decode tok/s | x float | best decode tok/s | best x float | TTFT (ms) "
             "| end-to-end tok/s | spread |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['export']} | {row['path']} | {row['kernel']} | {row['batch']} | {row['decode_tok_s']:.1f} | "
              f"{row['ratio_to_float']:.2f} | {row['best_decode_tok_s']:.1f} | {row['best_ratio_to_float']:.2f} | {row['ttft_ms']:.0f} | "
              f"{row['end_to_end_tok_s']:.1f} | {row['spread']:.0%} |" for row in rows]
    return "\n".join(lines)


def protocol(args: argparse.Namespace, batch_sizes: list[int], version: str, cpu: dict, load: dict) -> dict:
    return {"model": "bundled SmolLM2-135M-Instruct", "vllm": version, "dtype": DTYPE, "enforce_eager": True, "prefix_caching": False,
            "prompts": f"{max(batch_sizes)} distinct windows of {args.prompt_tokens} tokens of {DEFAULT_EVALUATION}",
            "batch_sizes": batch_sizes, "max_tokens": args.max_tokens, "sampling": "greedy, EOS ignored", "repeats": args.repeats,
            "statistic": "median of the repeats", "warmup": f"one run of {WARMUP_TOKENS} tokens per batch size",
            "environment": {key: value for key, value in vllm_environment(settings(None, args.cpus)).items() if key.startswith("VLLM_")},
            "w4a8_switch": W4A8_VARIABLE, "machine": platform.machine(), "cpu": cpu, "load_average": load,
            "python": platform.python_version(), "note": "exports written from the float16 model; vLLM casts them to bfloat16"}


def write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    python = vllm_python(args.vllm_python)
    version = vllm_version(python)  # a check of the interpreter before the exports are built
    batch_sizes = sorted({int(size) for size in args.batch_sizes.split(",")})
    cpu = cpu_info()
    load = {"before": os.getloadavg()}
    prompts = prompt_windows(max(batch_sizes), args.prompt_tokens)
    request = {"prompts": prompts, "batch_sizes": batch_sizes, "max_tokens": args.max_tokens, "repeats": args.repeats, "dtype": DTYPE,
               "warmup_tokens": WARMUP_TOKENS, "max_model_len": args.prompt_tokens + args.max_tokens}
    rows: list[dict] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.configs:
            config = CONFIGS[name]
            directory = build(config, Path(scratch) / name)
            for path in [None] if not config.passes else list(PATHS):
                served = run_in_vllm(_CHILD, directory, {**request, "adapter": config.adapter}, python, timeout=args.timeout,
                                     what=f"serve {name}", environment=settings(path, args.cpus))
                rows += rows_of(name, config, path, served, args, cpu["amx"])
                print(f"{name} {path or DTYPE}: {', '.join(served['kernels'])}; "
                      + ", ".join(f"batch {row['batch']} {row['decode_tok_s']:.1f} tok/s" for row in rows if row["config"] == name
                                  and row["path"] == (path or DTYPE)), flush=True)
                result = {"protocol": protocol(args, batch_sizes, version, cpu, load), "torch_vllm": served["torch"], "rows": rows}
                write(args.json, result)  # after each child, so that an interrupted run keeps what it measured
    add_ratios(rows)
    load["after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    result["table"] = table(rows)
    write(args.json, result)
    amx = "AMX present" if cpu["amx"] else "no AMX: the W4A8 rows run the W4A16 kernel"
    print(f"\n{table(rows)}\n\nvLLM {version}, {cpu['model']}, {cpu['logical_cpus']} logical CPUs, {amx}; "
          f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after; {result['seconds']:.0f} s\nwrote {args.json}")


if __name__ == "__main__":
    main()

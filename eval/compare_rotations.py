"""llm-compressor's own rotations (``QuIPModifier``, ``SpinQuantModifier``) under its RTN, measured
by the protocol of ``eval/rotation_grid.py``, so their numbers sit beside our ``rotate`` pass.

    python eval/compare_rotations.py --lc-python /path/to/venv/bin/python \
        [--schemes w4a16-g128,w3-g64,w4a4] [--transforms none,quip,spinquant:random-hadamard] \
        [--spinquant-rotations R1,R2,R4] [--symmetric-weights] [--windows 16] [--json eval/results/compare_rotations.json]

A transform is ``none``, ``quip`` or ``spinquant``, optionally ``:TYPE`` for its ``transform_type``
(``hadamard``, ``random-hadamard``, ``random-matrix``; default: the modifier's own, random-hadamard
for QuIP, hadamard for SpinQuant). llm-compressor runs in its own virtual environment (see
``compare_llmcompressor.py``), one process per row: the bundled SmolLM2-135M in float16, the
transform, then ``QuantizationModifier`` (data-free RTN: static weight scales, dynamic per-token
activation scales) through ``oneshot``. The model stays fake-quantized in memory (every forward
rounds weights and activations), and ``llmcompress.evaluate.perplexity`` scores it there with the
same windows and dtype as ``rotation_grid.py``. A row that fails records ``not run: <error>``.

What is compared: QuIP (rotations ["v"]) rotates the input of every Linear but lm_head, online
(a Hadamard at run time) with its inverse fused into the weight. SpinQuant R1 rotates the residual
stream (norms folded, embeddings centred, fused: no run-time cost), R2 each head's values (fused),
R4 down_proj's input (online). Ours is R1 plus the online down_proj rotation (QuaRot).

Caveats: llm-compressor cannot learn SpinQuant's rotations (``learnable`` is not implemented), so
SpinQuant here is QuaRot-like fixed Hadamards. Its ``hadamard`` type is Sylvester's, powers of two
only: SmolLM2's hidden size 576 and MLP size 1536 need ``random-hadamard``. The schemes are
rotation_grid's, written as compressed-tensors config groups: a group that does not divide a
layer's inputs is fitted as our pipeline fits it (576 inputs at g128 take g64; llm-compressor
refuses ragged groups, and its W4A16 preset cannot run here), weights asymmetric where ours are
(llm-compressor's W4A16/W4A4 presets are symmetric: ``--symmetric-weights`` makes all of its
weights so), activations symmetric per token; the two toolkits' scale formulas differ in detail.
Its online transforms run in the evaluation dtype (bfloat16 on a CPU with native bfloat16).
Seconds are the ``oneshot`` call alone. The float baseline is scored here with our transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import llmcompress
from llmcompress.evaluate import perplexity
from llmcompress.formats import dividing_group
from llmcompress.models import default_model_dir, load_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from compare_llmcompressor import _llmcompressor_available  # noqa: E402
from rotation_grid import SCHEMES  # noqa: E402

TRANSFORMS = ("none", "quip", "spinquant")

DRIVER = r'''
import json, sys, time, traceback, torch
args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
from llmcompress.evaluate import perplexity

name, _, kind = args["transform"].partition(":")
typed = {"transform_type": kind} if kind else {}
try:
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    if name == "quip":
        transform = [QuIPModifier(targets="Linear", ignore="lm_head", **typed)]
    elif name == "spinquant":
        transform = [SpinQuantModifier(rotations=args["rotations"], **typed)]
    else:
        transform = []
    recipe = transform + [QuantizationModifier(config_groups=args["scheme"], ignore=["lm_head"])]
    started = time.perf_counter()
    oneshot(model=model, recipe=recipe)
    seconds = time.perf_counter() - started
    result = perplexity(model, tokenizer, args["text"], seqlen=args["seqlen"], max_windows=args["windows"], progress=False)
except Exception as err:  # any failure is this row's result: the parent records it and goes on
    traceback.print_exc()
    print("ERROR " + json.dumps(f"{type(err).__name__}: {err}".strip().splitlines()[0]))
    sys.exit(1)
print("RESULT " + json.dumps({"perplexity": result.perplexity, "protocol": result.protocol, "compress_seconds": seconds,
                              "eval_seconds": result.seconds}))
'''

VERSIONS = ("import json, sys, compressed_tensors, llmcompressor, torch, transformers; print(json.dumps({'python': sys.version, "
            "'llmcompressor': llmcompressor.__version__, 'compressed_tensors': compressed_tensors.__version__, "
            "'transformers': transformers.__version__, 'torch': torch.__version__}))")


def their_config_groups(spec: dict, inputs: dict[str, int], symmetric_weights: bool) -> dict:
    """A rotation_grid scheme as compressed-tensors config groups, one per group size. Where the
    group does not divide a layer's inputs, the layer takes the group our pipeline fits
    (``dividing_group``: SmolLM2's 576-input layers take g64 under g128), since llm-compressor
    refuses ragged groups. ``inputs``: each quantized layer's name within its block -> inputs.
    Every activation scheme of the grid is per token, dynamic and symmetric; FP8 is E4M3."""
    acts = {}
    if "act_bits" in spec:
        kind = "float" if spec.get("act_kind", "int").startswith("fp8") else "int"
        acts["input_activations"] = {"num_bits": spec["act_bits"], "type": kind, "strategy": "token", "dynamic": True, "symmetric": True}
    by_group: dict[int, list[str]] = {}
    for leaf, in_features in sorted(inputs.items()):
        group = spec["group_size"]
        if group > 0 and in_features % group:
            group = dividing_group(in_features, group)
        by_group.setdefault(group, []).append(f"re:.*\\.{leaf}$")
    config = {}
    for group, targets in sorted(by_group.items()):
        weights = {"num_bits": spec["bits"], "type": "int", "symmetric": symmetric_weights or spec.get("symmetric", False),
                   **({"strategy": "group", "group_size": group} if group > 0 else {"strategy": "channel"})}
        config[f"g{group}"] = {"targets": targets, "weights": weights, **acts}
    return config


def run_row(args: argparse.Namespace, model_dir: str, inputs: dict[str, int], scheme: str, transform: str) -> dict:
    job = {"repo": str(REPO), "model": model_dir, "transform": transform, "rotations": args.spinquant_rotations.split(","),
           "scheme": their_config_groups(SCHEMES[scheme], inputs, args.symmetric_weights),
           "text": args.text, "seqlen": args.seqlen, "windows": args.windows}
    started = time.perf_counter()
    done = subprocess.run([args.lc_python, "-c", DRIVER, json.dumps(job)], capture_output=True, text=True)
    row = {"scheme": scheme, "transform": transform, "config_groups": job["scheme"], "wall_seconds": time.perf_counter() - started}
    if transform.startswith("spinquant"):
        row["rotations"] = job["rotations"]
    results = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode == 0 and results:
        return {**row, "status": "ok", **json.loads(results[-1])}
    errors = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("ERROR ")]
    # A crash that Python could not catch (killed, out of memory) leaves only stderr.
    stderr_lines = [line for line in done.stderr.splitlines() if line.strip()]
    first = errors[-1] if errors else (stderr_lines[-1] if stderr_lines else f"exit status {done.returncode}")
    return {**row, "status": f"not run: {first}", "stderr_tail": done.stderr[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lc-python", default=None, help="python of a virtual environment with llmcompressor")
    parser.add_argument("--schemes", default="w4a16-g128,w3-g64,w4a4", help=f"from rotation_grid: {','.join(SCHEMES)}")
    parser.add_argument("--transforms", default="none,quip,spinquant:random-hadamard", help="none, quip, spinquant, each optionally :TYPE")
    parser.add_argument("--spinquant-rotations", default="R1,R2,R4")
    parser.add_argument("--symmetric-weights", action="store_true", help="symmetric weights on llm-compressor's side, as its presets")
    parser.add_argument("--text", default="austen:test")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--json", default="eval/results/compare_rotations.json")
    args = parser.parse_args()
    schemes, transforms = args.schemes.split(","), args.transforms.split(",")
    unknown = [s for s in schemes if s not in SCHEMES] + [t for t in transforms if t.partition(":")[0] not in TRANSFORMS]
    if unknown:
        parser.error(f"unknown scheme(s) or transform(s) {', '.join(unknown)}: "
                     f"schemes {', '.join(SCHEMES)}; transforms {', '.join(TRANSFORMS)}")
    missing = _llmcompressor_available(args.lc_python)
    if missing:
        print(f"skipping the llm-compressor rotations: {missing}")
        return

    model, tokenizer = load_model(None)
    baseline = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_windows=args.windows, progress=False)
    print(f"float: {baseline.perplexity:.3f} ({baseline.protocol})", flush=True)
    # llm-compressor logs to stdout on import (no accelerator): the versions are the last line.
    done = subprocess.run([args.lc_python, "-c", VERSIONS], capture_output=True, text=True, check=True)
    versions = json.loads(done.stdout.splitlines()[-1])
    payload = {"protocol": baseline.to_dict(), "float": baseline.perplexity, "rows": [], "machine": platform.platform(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "llmcompress": llmcompress.__version__,
               "llm_compressor_environment": versions, "symmetric_weights": args.symmetric_weights}
    model_dir = str(default_model_dir())
    inputs = {name.rsplit(".", 1)[-1]: module.in_features for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name != "lm_head"}
    for scheme in schemes:
        for transform in transforms:
            row = run_row(args, model_dir, inputs, scheme, transform)
            if row["status"] == "ok":
                row["increase_over_float"] = row["perplexity"] / baseline.perplexity - 1
                if row["protocol"] != baseline.protocol:  # e.g. another evaluation dtype: the rows would not compare
                    print(f"warning: {scheme} {transform} was scored as {row['protocol']}", flush=True)
                print(f"{scheme:11s} {transform:28s} ppl {row['perplexity']:9.3f} ({100 * row['increase_over_float']:+.1f}%)  "
                      f"{row['compress_seconds']:.1f} s", flush=True)
            else:
                print(f"{scheme:11s} {transform:28s} {row['status']}", flush=True)
            payload["rows"].append(row)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(payload, indent=2))

    print(f"\nllm-compressor {versions['llmcompressor']}, SmolLM2-135M-Instruct; float {baseline.perplexity:.3f}; {baseline.protocol}\n")
    print("| scheme | transform | perplexity | increase over float | seconds |")
    print("|---|---|---:|---:|---:|")
    for row in payload["rows"]:
        if row["status"] == "ok":
            print(f"| {row['scheme']} | {row['transform']} | {row['perplexity']:.3f} | {100 * row['increase_over_float']:+.1f}% | "
                  f"{row['compress_seconds']:.1f} |")
        else:
            print(f"| {row['scheme']} | {row['transform']} | {row['status']} | | |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

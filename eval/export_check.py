"""Our model against its compressed-tensors export as transformers (+ peft) load it, on the full
evaluation protocol: the perplexity gap each export leaves.

    python eval/export_check.py [--configs w4g64s,w4g64,nvfp4,w4g64s-gptq-eora32] [--json eval/results/export_check.json]

Each configuration compresses the bundled SmolLM2, scores it with ``llmcompress.evaluate``,
exports it (low-rank branches as a PEFT adapter), and scores the same token windows in a fresh
process that loads the export with transformers' ``from_pretrained`` and peft's
``PeftModel.from_pretrained`` and never imports llmcompress (``llmcompress.export.verify``).
NVFP4 is compared in bfloat16 (compressed-tensors decompresses it to bfloat16), the rest in float16.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import llmcompress
from llmcompress.calib import DEFAULT_EVALUATION, read_text, tokenize
from llmcompress.config import CompressConfig, LowRankConfig, QuantFormat
from llmcompress.evaluate import perplexity
from llmcompress.export import export
from llmcompress.export.verify import their_perplexity
from llmcompress.models import cast_model, default_model_dir, load_model

CONFIGS = {
    "w4g64s": (QuantFormat(bits=4, group_size=64, symmetric=True), "rtn", 0, torch.float16),
    "w4g64": (QuantFormat(bits=4, group_size=64), "rtn", 0, torch.float16),
    "nvfp4": (QuantFormat(kind="nvfp4"), "rtn", 0, torch.bfloat16),
    "w4g64s-gptq-eora32": (QuantFormat(bits=4, group_size=64, symmetric=True), "gptq", 32, torch.float16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--json", default="eval/results/export_check.json")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        fmt, method, rank, dtype = CONFIGS[name]
        started = time.perf_counter()
        model, tokenizer = load_model(default_model_dir())
        lowrank = LowRankConfig(rank=rank, method="eora") if rank else LowRankConfig()
        llmcompress.compress(model, CompressConfig(quant=fmt, method=method, lowrank=lowrank),
                             calibration=None if method != "rtn" or rank else "none", tokenizer=tokenizer, progress=False)
        tokens = tokenize(read_text(DEFAULT_EVALUATION), tokenizer)
        windows = tokens[: args.eval_windows * args.eval_seqlen].reshape(args.eval_windows, args.eval_seqlen)
        ours = perplexity(cast_model(model, dtype), tokenizer, windows.reshape(-1), seqlen=args.eval_seqlen, progress=False,
                          dtype=str(dtype).replace("torch.", "")).perplexity
        with tempfile.TemporaryDirectory() as scratch:
            out = export(model, Path(scratch) / name, format="compressed-tensors", tokenizer=tokenizer)
            theirs = their_perplexity(out, windows, dtype, adapter=bool(rank))
        row = {"config": name, "format": fmt.describe(), "method": method, "adapter_rank": rank, "dtype": str(dtype).replace("torch.", ""),
               "ours": ours, "theirs": theirs, "relative_gap": theirs / ours - 1, "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{name:20} {row['dtype']:9} ours {ours:8.3f}  transformers{'+peft' if rank else '     '} {theirs:8.3f}  "
              f"gap {100 * row['relative_gap']:+.4f}%", flush=True)
    protocol = f"{DEFAULT_EVALUATION}, {args.eval_windows} windows of {args.eval_seqlen} tokens, first token of each unscored"
    result = {"protocol": protocol, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{protocol}\nwrote {args.json}")


if __name__ == "__main__":
    main()

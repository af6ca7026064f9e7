"""Decode speed of a Llama-2-7B-shaped stack of decoder blocks: FP16 against W4 g128 + rank 32.

    python eval/bench_decode.py [--blocks 32] [--context 512] [--json eval/results/bench_decode.json]

Random weights (speed does not depend on them). Each block is RMSNorm, q/k/v/o projections,
attention over a static KV cache of ``--context`` positions, RMSNorm, and the SiLU-gated MLP;
hidden 4096, intermediate 11008, 32 heads. One decode step (batch 1, one token through every
block) is captured in a CUDA graph and replayed; tokens/s is 1 / median step time. The W4 stack
uses ``CompressedLinear`` (INT4 g128 asymmetric plus a rank-32 float16 branch), so it runs
whatever ``ops.py`` dispatches to. Needs a CUDA GPU and CuPy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from torch import nn

from bench_kernels import time_calls  # eval/ is on sys.path when this file runs as a script
from llmcompress.config import QuantFormat
from llmcompress.formats import quantize
from llmcompress.methods.lowrank import LowRank
from llmcompress.nn import CompressedLinear

HIDDEN, INTERMEDIATE, HEADS = 4096, 11008, 32
HEAD_DIM = HIDDEN // HEADS
FORMAT = QuantFormat(bits=4, group_size=128)
RANK = 32


def make_linear(in_features: int, out_features: int, compressed: bool) -> nn.Module:
    weight = torch.randn(out_features, in_features, device="cuda") * in_features**-0.5
    if not compressed:
        layer = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.float16)
        layer.weight.data.copy_(weight)
        return layer
    branch = LowRank(a=torch.randn(RANK, in_features, device="cuda") * 0.01, b=torch.randn(out_features, RANK, device="cuda") * 0.01)
    return CompressedLinear.from_quantized(quantize(weight, FORMAT), FORMAT, None, branch=branch)


class DecoderBlock(nn.Module):
    def __init__(self, compressed: bool, context: int) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(HIDDEN, device="cuda", dtype=torch.float16)
        self.norm_mlp = nn.RMSNorm(HIDDEN, device="cuda", dtype=torch.float16)
        self.q, self.k, self.v, self.o = (make_linear(HIDDEN, HIDDEN, compressed) for _ in range(4))
        self.gate, self.up = (make_linear(HIDDEN, INTERMEDIATE, compressed) for _ in range(2))
        self.down = make_linear(INTERMEDIATE, HIDDEN, compressed)
        self.register_buffer("k_cache", torch.randn(1, HEADS, context, HEAD_DIM, device="cuda", dtype=torch.float16))
        self.register_buffer("v_cache", torch.randn(1, HEADS, context, HEAD_DIM, device="cuda", dtype=torch.float16))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        q = self.q(h).view(1, 1, HEADS, HEAD_DIM).transpose(1, 2)
        self.k_cache.index_copy_(2, position, self.k(h).view(1, 1, HEADS, HEAD_DIM).transpose(1, 2))
        self.v_cache.index_copy_(2, position, self.v(h).view(1, 1, HEADS, HEAD_DIM).transpose(1, 2))
        attention = torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        x = x + self.o(attention.transpose(1, 2).reshape(1, 1, HIDDEN))
        h = self.norm_mlp(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def step_microseconds(blocks: nn.ModuleList, replays: int) -> float:
    x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.float16)
    position = torch.tensor([7], device="cuda")

    def step() -> torch.Tensor:
        h = x
        for block in blocks:
            h = block(h, position)
        return h

    with torch.no_grad():
        return time_calls([step], replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=32, help="decoder blocks (Llama-2-7B has 32)")
    parser.add_argument("--context", type=int, default=512, help="KV cache positions attended to")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--json", default="eval/results/bench_decode.json")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    rows = {}
    for name, compressed in (("fp16", False), ("w4g128_r32", True)):
        torch.manual_seed(0)
        blocks = nn.ModuleList(DecoderBlock(compressed, args.context) for _ in range(args.blocks))
        microseconds = step_microseconds(blocks, args.replays)
        weight_bytes = sum(b.nbytes for b in blocks.buffers() if b.dtype != torch.float16 or b.dim() == 2) + sum(
            p.nbytes for p in blocks.parameters())
        rows[name] = {"step_us": microseconds, "tokens_per_s": 1e6 / microseconds, "weight_bytes": weight_bytes}
        print(f"{name:12s} {microseconds:9.1f} us/token  {1e6 / microseconds:8.1f} tokens/s  "
              f"weights {weight_bytes / 2**30:.2f} GiB", flush=True)
        del blocks
        torch.cuda.empty_cache()
    speedup = rows["w4g128_r32"]["tokens_per_s"] / rows["fp16"]["tokens_per_s"]
    print(f"W4 g128 + rank 32 over FP16: {speedup:.2f}x decode tokens/s")
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    result = {"gpu": torch.cuda.get_device_name(0), "commit": commit, "torch": torch.__version__, "blocks": args.blocks,
              "context": args.context, "format": FORMAT.describe(), "rank": RANK, "rows": rows, "speedup": speedup}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

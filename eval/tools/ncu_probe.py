"""Three launches of the fused kernel (INT4 g128, 8192 x 8192, M = 1, rank 32), for a profiler:

    ncu --kernel-name regex:w4_linear --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy python3 eval/tools/ncu_probe.py
"""
import torch
from llmcompress.config import QuantFormat
from llmcompress.cuda import launch
import sys; sys.path.insert(0, "eval")
from bench_kernels import packed_layer
pk = packed_layer(QuantFormat(bits=4, group_size=128), 8192, 8192, 32, torch.float16)
x = torch.randn(1, 8192, device="cuda", dtype=torch.float16)
for _ in range(3):
    launch.fused_linear(x, pk, None)
torch.cuda.synchronize()

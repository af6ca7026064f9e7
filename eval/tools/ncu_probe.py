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

"""Compile ``kernels/w4_linear.cu`` once through CuPy and launch it on PyTorch's current stream.

Tensors cross to CuPy through DLPack (zero-copy, on the same stream, so no synchronisation).
Dispatch by the number of tokens M (``path``): up to ``FUSED_MAX_M`` the fused kernel streams
the 4-bit weight once; above it the weight is dequantized to 16 bits and cuBLAS does the
product, since a tensor-core GEMM reuses each weight across many tokens and the 4-bit read
stops mattering (``eval/bench_kernels.py --sweep-dispatch`` times the paths side by side).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy
import torch
from torch import Tensor

from .prepack import K_BLOCK, ROW_TILE, Prepacked

SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "w4_linear.cu"
THREADS = 256
ROWS_PER_BLOCK = 128
CHUNK_BLOCKS = 4  # k-blocks of x staged per shared-memory chunk (CHUNK_KB in the kernel)
X_STRIDE = CHUNK_BLOCKS * K_BLOCK + 8
TOKEN_TILES = (1, 2, 4, 8)  # MT: mma n-tiles of 8 tokens per block
FUSED_MAX_M = 8 * TOKEN_TILES[-1]
# Split-K aims for this many blocks per multiprocessor (two 256-thread blocks of 110 registers
# are resident at once, per ncu) but keeps at least MIN_SPLIT_BLOCKS k-blocks per split: measured on an H100 at 4096^2
# and 8192^2 for M = 1, 16 (eval/bench_kernels.py --sweep-splits).
BLOCKS_PER_SM = 2
MIN_SPLIT_BLOCKS = 16
# Up to 16 tokens the kernel stages a split's whole K-slice of x in shared memory.
WHOLE_SLICE_MAX_TILES = 2
COUNTER_SLOTS = 4
MIN_CAPABILITY = (8, 0)  # mma.sync with BF16, ldmatrix
_NULL = numpy.uint64(0)


class KernelUnavailable(RuntimeError):
    """No fused kernel here (no CuPy, no CUDA source, or an older GPU); use the reference."""


# Kernel variant -> (C++ activation type, weight kind) of the source's W4_VARIANT list.
VARIANTS = {f"{kind}_{suffix}": (ctype, kind_enum) for kind, kind_enum in (("int4", "INT4"), ("int4g32", "INT4_G32"),
                                                                           ("nvfp4", "NVFP4"), ("mxfp4", "MXFP4"))
            for suffix, ctype in (("f16", "__half"), ("bf16", "__nv_bfloat16"))}


def check_cupy() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        raise KernelUnavailable("CuPy is not installed (pip install -e '.[cuda]')") from error
    if not SOURCE.is_file():
        raise KernelUnavailable(f"the kernel source {SOURCE} is missing: install llmcompress from a checkout (pip install -e .)")


@functools.cache
def load_module(variant: str):  # noqa: ANN201 - cupy.RawModule, imported lazily
    """One variant's kernels, compiled on first use (CuPy caches the binary on disk, keyed by
    source and options, so later processes load it without compiling)."""
    check_cupy()
    import cupy

    return cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17", *compile_defines(variant)))


def compile_defines(variant: str) -> tuple[str, ...]:
    """The defines that select one variant of the source (tests/cuda_emulator builds it with them too)."""
    ctype, kind = VARIANTS[variant]
    return f"-DW4_SUFFIX={variant}", f"-DW4_T={ctype}", f"-DW4_KIND={kind}"


def check_device(device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise KernelUnavailable(f"GPU compute capability {capability} < {MIN_CAPABILITY}: the kernel needs mma.sync with BF16")


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _fused_kernel(variant: str, token_tiles: int):  # noqa: ANN202 - a cupy.RawKernel
    return load_module(variant).get_function(fused_kernel_name(variant, token_tiles))


def fused_kernel_name(variant: str, token_tiles: int) -> str:
    return f"w4_linear_{variant}_mt{token_tiles}"


@functools.cache
def _dynamic_shared_limit(variant: str, token_tiles: int, device_index: int) -> int:
    """The dynamic shared memory a block of this kernel may take: the GPU's per-block limit (227 KB
    on an H100, 99 KB on sm_89) less the kernel's static flags, which count against it too."""
    per_block = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    return per_block - _fused_kernel(variant, token_tiles).shared_size_bytes


_COUNTERS: dict[tuple[int, int], Tensor] = {}


def _counters(device: torch.device, slots: int) -> Tensor:
    """Zeroed int32 counters, one set per (device, stream): every launch leaves them zeroed."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < slots:
        counters = torch.zeros(max(slots, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def variant_of(pk: Prepacked) -> str:
    """The kernel variant (a key of VARIANTS) that serves ``pk``."""
    return f"{pk.kind}_{'f16' if pk.dtype == torch.float16 else 'bf16'}"


_STREAMS: dict[int, object] = {}


def _stream(device: torch.device):  # noqa: ANN202 - a CuPy stream
    """PyTorch's current stream as a CuPy stream (kept, so it is wrapped once)."""
    import cupy

    pointer = torch.cuda.current_stream(device).cuda_stream
    if pointer not in _STREAMS:
        _STREAMS[pointer] = cupy.cuda.ExternalStream(pointer)
    return _STREAMS[pointer]


def _arg(argument: object):  # noqa: ANN202 - a CuPy array, a null pointer or the scalar itself
    if argument is None:
        return _NULL
    if not isinstance(argument, Tensor):
        return argument
    import cupy

    return cupy.from_dlpack(argument)


def token_tile(tokens: int) -> int:
    """MT, the kernel variant for ``tokens``: the fewest 8-token mma tiles that cover them."""
    return next(mt for mt in TOKEN_TILES if 8 * mt >= min(tokens, FUSED_MAX_M))


def path(tokens: int) -> str:
    """Which path ``linear`` takes for ``tokens`` rows of x."""
    return "fused" if tokens <= FUSED_MAX_M else "dequant+cuBLAS"


def fused_plan(pk: Prepacked, tokens: int, wave: int, shared_limit: int, splits: int | None = None,
               branch_items: int | None = None) -> dict[str, int]:
    """Grid decomposition of one fused launch for a GPU that holds ``wave`` blocks at once and
    gives a block at most ``shared_limit`` bytes: token tile, K splits, branch items, blocks,
    and the block's dynamic shared memory. ``splits`` and ``branch_items`` override the rule
    (eval/bench_kernels.py sweeps them to set it)."""
    token_tiles = token_tile(tokens)
    m_tiles = -(-tokens // (8 * token_tiles))
    k_blocks = -(-pk.in_features // K_BLOCK)
    row_tiles = -(-pk.out_features // ROW_TILE)
    row_blocks = -(-row_tiles // (ROWS_PER_BLOCK // ROW_TILE))
    tiles = row_blocks * m_tiles
    # One wave: a grid larger than what is resident at once leaves a partial second wave,
    # which ncu measured as up to half the time (8192^2, rank 32: 288 blocks for 264 slots).
    if splits is None:
        splits = max(1, min(round(wave / tiles), k_blocks // MIN_SPLIT_BLOCKS))
    blocks_per_split = -(-k_blocks // splits)
    row_bytes = 8 * token_tiles * pk.dtype.itemsize  # one staged column of x
    if token_tiles <= WHOLE_SLICE_MAX_TILES:
        # The staged slice must fit in shared memory: split further if it does not.
        blocks_per_split = min(blocks_per_split, (shared_limit // row_bytes - 8) // K_BLOCK)
    splits = -(-k_blocks // blocks_per_split)
    stride = max(blocks_per_split * K_BLOCK + 8, X_STRIDE) if token_tiles <= WHOLE_SLICE_MAX_TILES else X_STRIDE
    if not pk.rank:
        branch_items = 0
    elif branch_items is not None:
        branch_items = max(1, min(branch_items, k_blocks))
    else:
        # Each down-projection item reads at most half the bytes of a main item's weights (A is
        # 16-bit, W 4-bit), so it finishes before the main items need t, and the items are made
        # larger still where needed to fit in the slots the main items leave in the wave: the
        # main items keep the split count of rank 0. Many small items (4 k-blocks each) cost
        # the main items a split at 8192^2 and made the branch +23% (kernels/NOTES.md).
        r_pad = pk.lowrank_a.shape[0]
        item_blocks = max(1, ROWS_PER_BLOCK * blocks_per_split // (8 * r_pad))
        branch_items = -(-k_blocks // item_blocks)
        room = wave - tiles * splits
        if 0 < room < branch_items:
            branch_items = room
    return dict(token_tiles=token_tiles, m_tiles=m_tiles, tiles=tiles, splits=splits, blocks_per_split=blocks_per_split,
                branch_items=branch_items, blocks=branch_items + tiles * splits,
                shared=stride * row_bytes)


def device_plan(pk: Prepacked, tokens: int, splits: int | None = None, branch_items: int | None = None) -> dict[str, int]:
    """``fused_plan`` for the GPU that holds ``pk``."""
    device = pk.qweight.device.index
    shared_limit = _dynamic_shared_limit(variant_of(pk), token_tile(tokens), device)
    return fused_plan(pk, tokens, BLOCKS_PER_SM * _multiprocessors(device), shared_limit, splits, branch_items)


def fused_arguments(x: Tensor, pk: Prepacked, bias: Tensor | None, y: Tensor, counters: Tensor,
                    plan: dict[str, int]) -> tuple:
    """The fused kernel's arguments in its parameter order, with the workspace ``plan`` needs:
    tensors (None for a null pointer), then numpy scalars."""
    m_pad = plan["m_tiles"] * 8 * plan["token_tiles"]
    n_pad = -(-pk.out_features // ROW_TILE) * ROW_TILE
    r_pad = 0 if pk.lowrank_a is None else pk.lowrank_a.shape[0]
    device = x.device
    split_part = torch.empty(plan["splits"] * m_pad * n_pad, dtype=torch.float32, device=device) if plan["splits"] > 1 else None
    t_part = torch.empty(plan["branch_items"] * m_pad * r_pad, dtype=torch.float32, device=device) if pk.rank else None
    t_final = torch.empty(m_pad * r_pad, dtype=x.dtype, device=device) if pk.rank else None
    return (x, pk.perm, pk.qweight, pk.records, pk.lowrank_a, pk.lowrank_b, bias, y, counters, split_part, t_part, t_final,
            numpy.int32(x.shape[0]), numpy.int32(pk.out_features), numpy.int32(pk.in_features), numpy.int32(pk.group_size),
            numpy.int32(pk.rank), numpy.int32(plan["splits"]), numpy.int32(plan["blocks_per_split"]),
            numpy.int32(plan["branch_items"]), numpy.float32(pk.out_scale), numpy.int32(pk.scale_shift))


def fused_linear(x: Tensor, pk: Prepacked, bias: Tensor | None, out: Tensor | None = None, splits: int | None = None,
                 branch_items: int | None = None) -> Tensor:
    """y [M, N] = x [M, K] through the fused kernel (any M; one launch)."""
    plan = device_plan(pk, x.shape[0], splits, branch_items)
    y = torch.empty(x.shape[0], pk.out_features, dtype=x.dtype, device=x.device) if out is None else out
    arguments = fused_arguments(x, pk, bias, y, _counters(x.device, COUNTER_SLOTS + plan["tiles"]), plan)
    kernel = _fused_kernel(variant_of(pk), plan["token_tiles"])
    shared = plan["shared"]
    if shared > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shared
    with _stream(x.device):
        kernel((plan["blocks"],), (THREADS,), tuple(_arg(a) for a in arguments), shared_mem=shared)
    return y


def dequant_kernel_name(variant: str) -> str:
    return f"w4_dequant_{variant}"


DEQUANT_THREADS = 256


def dequant_blocks(pk: Prepacked) -> int:
    """The dequantizer's grid: one thread per prepacked word, DEQUANT_THREADS per block."""
    return -(-pk.qweight.numel() // DEQUANT_THREADS)


def dequant_arguments(pk: Prepacked, w: Tensor) -> tuple:
    """The dequantizer's arguments in its parameter order (one thread per prepacked word)."""
    return (pk.qweight, pk.records, w, numpy.int32(pk.out_features), numpy.int32(pk.in_features),
            numpy.int32(pk.group_size), numpy.float32(pk.out_scale), numpy.int32(pk.scale_shift))


def dequantize_prepacked(pk: Prepacked) -> Tensor:
    """The dense [N, K] weight (columns in prepacked order) in the activation dtype."""
    w = torch.empty(pk.out_features, pk.in_features, dtype=pk.dtype, device=pk.qweight.device)
    variant = variant_of(pk)
    kernel = load_module(variant).get_function(dequant_kernel_name(variant))
    with _stream(w.device):
        kernel((dequant_blocks(pk),), (DEQUANT_THREADS,), tuple(_arg(a) for a in dequant_arguments(pk, w)))
    return w


def dequantized_linear(x: Tensor, pk: Prepacked, bias: Tensor | None) -> Tensor:
    """The large-M path: dequantize, cuBLAS, then the branch as two small matmuls."""
    inputs = x if pk.perm is None else x[:, pk.perm.long()]
    y = inputs @ dequantize_prepacked(pk).T
    if pk.rank:
        y = y + (inputs @ pk.lowrank_a[:, : pk.in_features].T) @ pk.lowrank_b[: pk.out_features].T
    return y if bias is None else y + bias.to(y.dtype)


def linear(x: Tensor, pk: Prepacked, bias: Tensor | None) -> Tensor:
    """y = x W^T + B (A x) + b for x [..., K] on the GPU, by the dispatch rule above."""
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    y = fused_linear(flat, pk, bias) if path(flat.shape[0]) == "fused" else dequantized_linear(flat, pk, bias)
    return y.reshape(*x.shape[:-1], pk.out_features)

"""Compile one of the kernel sources of ``kernels/`` through CuPy and launch it on PyTorch's current stream.

Tensors cross to CuPy through DLPack (zero-copy, on the same stream, so no synchronisation).

Sources (``SOURCES``): the environment variable ``LLMCOMPRESS_KERNEL`` picks one at run time,
``default`` when it is unset or empty; any other value is a ``ConfigError`` naming the choices.

- ``default``, ``kernels/w4_linear.cu``, measured on an H100 (docs/decisions/0001-0003). Dispatch
  by the number of tokens M (``path``): up to 64 the fused kernel streams the 4-bit weight once;
  above it the weight is dequantized to 16 bits and cuBLAS does the product, since a tensor-core
  GEMM reuses each weight across many tokens and the 4-bit read stops mattering.
- ``tiled``, ``kernels/w4_linear_tiled.cu``, compiled and run on the CPU emulator but not yet on a
  GPU, so off by default (docs/decisions/0004-0007): up to 16 tokens the fused kernel, its warps
  streaming their weights through a cp.async ring; up to 1024 the tiled kernel, whose blocks reuse
  each decoded weight fragment across 64 or 128 tokens (on Hopper, the wgmma kernel in its place:
  warpgroup MMAs on tiles of up to 256 tokens); above that dequantize + cuBLAS.

``eval/bench_kernels.py --sweep-dispatch`` times the paths side by side to set the limits.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import Tensor

from ..errors import ConfigError
from .prepack import K_BLOCK, ROW_TILE, Prepacked

KERNEL_ENV = "LLMCOMPRESS_KERNEL"
# Where the kernel sources live: kernels/ of the checkout, or, in a wheel's install, what
# pyproject.toml's data-files puts under the environment's data directory.
CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
INSTALLED_KERNELS = "share/llmcompress/kernels"
# A source's `#include "w4_common.cuh"`: kernel_text puts the file's text in its place.
INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.MULTILINE)
WARPS = 8
THREADS = 32 * WARPS
ROWS_PER_BLOCK = 128
CHUNK_BLOCKS = 4  # k-blocks of x staged per shared-memory chunk (CHUNK_KB in the kernel)
X_STRIDE = CHUNK_BLOCKS * K_BLOCK + 8
TOKEN_TILES = (1, 2, 4, 8)  # MT: mma n-tiles of 8 tokens per block
GEMM_TOKEN_TILES = (4, 8)  # the tiled kernel's MT: tiles of 16 * MT tokens (two warps along M)
GEMM_ROW_TILES = 8  # 16-row tiles per block
GEMM_STAGES = 4  # cp.async stages of one k-block (GEMM_STAGES in the kernel)
GEMM_X_STRIDE = K_BLOCK + 8
# The wgmma kernel's MT: tiles of 8 * MT tokens, one wgmma of 64 tokens per 8 of them. Built only
# for sm_90a (Hopper), where the loader compiles with WGMMA_ARCH and dispatch takes it instead of
# the tiled kernel.
WGMMA_TOKEN_TILES = (8, 16, 32)
WGMMA_CAPABILITY = (9, 0)
WGMMA_ARCH = "-arch=sm_90a"
# Split-K fills one wave of resident blocks but keeps at least MIN_SPLIT_BLOCKS k-blocks per
# split: measured on an H100 at 4096^2 and 8192^2 for M = 1, 16 (eval/bench_kernels.py --sweep-splits).
MIN_SPLIT_BLOCKS = 16
# Up to 16 tokens the fused kernel stages a split's whole K-slice of x in shared memory.
WHOLE_SLICE_MAX_TILES = 2
COUNTER_SLOTS = 4
MIN_CAPABILITY = (8, 0)  # mma.sync with BF16, ldmatrix
_NULL = numpy.uint64(0)


class KernelUnavailable(RuntimeError):
    """No fused kernel here (no CuPy, no CUDA source, or an older GPU); use the reference."""


@dataclass(frozen=True)
class KernelSource:
    """One kernel source under kernels/ that LLMCOMPRESS_KERNEL can select, and what the host
    must know of it: its kernel families ("linear", the fused kernel, in every source; "gemm",
    the tiled kernel, and "wgmma", its Hopper form), where dispatch hands over from one to the
    next, how the split-K plan counts resident blocks, and its weight ring."""

    name: str
    filename: str
    fused_max_m: int  # the fused kernel up to this many tokens
    tiled_max_m: int  # then the tiled kernel (wgmma on Hopper) up to this many; dequantize + cuBLAS above
    blocks_per_sm: int | None  # the fused kernel's resident blocks per multiprocessor; None: CUDA's occupancy calculator
    ring_stages: int = 0  # k-blocks in each warp's cp.async weight ring (W4_STAGES in the kernel); 0: no ring
    families: tuple[str, ...] = ("linear",)

    @property
    def path(self) -> Path:
        return source_path(self.filename)


SOURCES = {source.name: source for source in (
    # Two blocks of 256 threads at 108-128 registers are resident per multiprocessor (ncu).
    KernelSource("default", "w4_linear.cu", fused_max_m=64, tiled_max_m=64, blocks_per_sm=2),
    # Not measured yet: TILED_MAX_M = 1024 is the tiled kernel's predicted crossover (about 75 us at
    # 8192^2 and M = 256 against 159 us for dequantize + cuBLAS); set both from --sweep-dispatch.
    KernelSource("tiled", "w4_linear_tiled.cu", fused_max_m=16, tiled_max_m=1024, blocks_per_sm=None, ring_stages=6,
                 families=("linear", "gemm", "wgmma")),
)}
DEFAULT_SOURCE = "default"

# Kernel variant -> (C++ activation type, weight kind) of the sources' W4_VARIANT lists.
VARIANTS = {f"{kind}_{suffix}": (ctype, kind_enum) for kind, kind_enum in (("int4", "INT4"), ("int4g32", "INT4_G32"),
                                                                           ("nvfp4", "NVFP4"), ("mxfp4", "MXFP4"))
            for suffix, ctype in (("f16", "__half"), ("bf16", "__nv_bfloat16"))}


def selected() -> KernelSource:
    """The source LLMCOMPRESS_KERNEL names (read at each call), ``default`` when it is unset or empty."""
    name = os.environ.get(KERNEL_ENV, "").strip() or DEFAULT_SOURCE
    if name not in SOURCES:
        raise ConfigError(f"{KERNEL_ENV}={name!r} names no kernel source: choose one of {', '.join(SOURCES)} "
                          f"(kernels/README.md); unset, it is {DEFAULT_SOURCE!r}")
    return SOURCES[name]


def __getattr__(name: str) -> int:
    """FUSED_MAX_M and TILED_MAX_M, the selected source's dispatch limits, under their one-source names."""
    if name in ("FUSED_MAX_M", "TILED_MAX_M"):
        return getattr(selected(), name.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def installed_kernels(site: Path = CHECKOUT_KERNELS.parent) -> Path | None:
    """The kernel sources a wheel installed beside the llmcompress package found in ``site``
    (its RECORD says where the data-files went: the venv's, the user's or a --prefix's data
    directory), or None where nothing installed them (a checkout)."""
    for dist in importlib.metadata.distributions(name="llmcompress", path=[str(site)]):
        for file in dist.files or ():
            if file.match(f"{INSTALLED_KERNELS}/*.cu"):
                return Path(dist.locate_file(file)).resolve().parent
    return None


def kernel_dirs() -> tuple[Path, ...]:
    """Where the loader looks for kernel sources, in order: kernels/ of the checkout this package
    runs from (an editable install or PYTHONPATH, where the sources are being edited), then the
    copy that an installed wheel carries. An installed package has no checkout beside it."""
    installed = installed_kernels()
    return (CHECKOUT_KERNELS,) if installed is None else (CHECKOUT_KERNELS, installed)


def source_path(filename: str) -> Path:
    """The first of kernel_dirs() holding ``filename`` (the checkout's path where none does)."""
    return next((folder / filename for folder in kernel_dirs() if (folder / filename).is_file()), CHECKOUT_KERNELS / filename)


def kernel_text(source: KernelSource) -> str:
    """The source as NVRTC and tests/cuda_emulator compile it: each `#include "..."` of a file
    beside it replaced by that file's text, so that CuPy's binary cache, keyed by the text, sees
    a change to the shared header too."""
    path = source.path
    return INCLUDE.sub(lambda match: (path.parent / match[1]).read_text(), path.read_text())


def check_cupy(source: KernelSource | None = None) -> None:
    source = source or selected()
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        raise KernelUnavailable("CuPy is not installed (pip install -e '.[cuda]')") from error
    if not source.path.is_file():
        places = " or ".join(str(folder) for folder in kernel_dirs())
        raise KernelUnavailable(f"the kernel source {source.filename} is in neither {places}: reinstall llmcompress "
                                "(pip install .) or run it from a checkout")


def load_module(variant: str, source: KernelSource | None = None):  # noqa: ANN201 - cupy.RawModule, imported lazily
    """One variant's kernels for the current GPU, compiled on first use (CuPy caches the binary
    on disk, keyed by source and options, so later processes load it without compiling)."""
    return _module(source or selected(), variant)


@functools.cache
def _module(source: KernelSource, variant: str):  # noqa: ANN202 - cupy.RawModule
    check_cupy(source)
    import cupy

    return cupy.RawModule(code=kernel_text(source), options=module_options(variant, torch.cuda.get_device_capability(), source))


def module_options(variant: str, capability: tuple[int, int], source: KernelSource | None = None) -> tuple[str, ...]:
    """NVRTC's options for one variant on a GPU of ``capability``: for a source with the wgmma
    kernel, on Hopper also sm_90a. CuPy appends the plain -arch=sm_90 itself, and NVRTC 12.9 then
    builds for sm_90a (checked with NVRTC 12.9 and a wgmma instruction, which sm_90 refuses)."""
    source = source or selected()
    arch = (WGMMA_ARCH,) if "wgmma" in source.families and capability == WGMMA_CAPABILITY else ()
    return ("-std=c++17", *compile_defines(variant, source), *arch)


def compile_defines(variant: str, source: KernelSource | None = None) -> tuple[str, ...]:
    """The defines that select one variant of a source (tests/cuda_emulator builds it with them too)."""
    source = source or selected()
    ctype, kind = VARIANTS[variant]
    stages = (f"-DW4_STAGES={source.ring_stages}",) if source.ring_stages else ()
    return (f"-DW4_SUFFIX={variant}", f"-DW4_T={ctype}", f"-DW4_KIND={kind}", *stages)


def check_device(device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise KernelUnavailable(f"GPU compute capability {capability} < {MIN_CAPABILITY}: the kernel needs mma.sync with BF16")


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _kernel(source: KernelSource, variant: str, family: str, token_tiles: int):  # noqa: ANN202 - a cupy.RawKernel
    """The "linear" (fused), "gemm" (tiled) or "wgmma" (Hopper) kernel of ``variant`` for ``token_tiles``."""
    return load_module(variant, source).get_function(kernel_name(variant, family, token_tiles))


def kernel_name(variant: str, family: str, token_tiles: int) -> str:
    return f"w4_{family}_{variant}_mt{token_tiles}"


@functools.cache
def _dynamic_shared_limit(source: KernelSource, variant: str, family: str, token_tiles: int, device_index: int) -> int:
    """The dynamic shared memory a block of this kernel may take: the GPU's per-block limit (227 KB
    on an H100, 99 KB on sm_89) less the kernel's static flags, which count against it too."""
    per_block = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    return per_block - _kernel(source, variant, family, token_tiles).shared_size_bytes


@functools.cache
def _resident_blocks(source: KernelSource, variant: str, family: str, token_tiles: int, shared: int, device_index: int) -> int:
    """Blocks of the kernel one multiprocessor holds at once with ``shared`` bytes of dynamic
    shared memory each (CUDA's occupancy calculator on the compiled kernel)."""
    import cupy

    kernel = _kernel(source, variant, family, token_tiles)
    with cupy.cuda.Device(device_index):
        if shared > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared
        return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, THREADS, shared)


def ring_bytes(pk: Prepacked, source: KernelSource | None = None) -> int:
    """Shared memory of the fused kernel's weight ring: per warp and stage, each lane's word and
    record (none without a ring)."""
    word_bytes = pk.qweight.shape[-1] * pk.qweight.element_size()
    return WARPS * (source or selected()).ring_stages * 32 * (word_bytes + pk.records.shape[-1])


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
    """MT, the fused kernel's variant for ``tokens``: the fewest 8-token mma tiles that cover them."""
    return next(mt for mt in TOKEN_TILES if 8 * mt >= min(tokens, 8 * TOKEN_TILES[-1]))


def path(tokens: int, capability: tuple[int, int] = MIN_CAPABILITY, source: KernelSource | None = None) -> str:
    """Which path ``linear`` takes for ``tokens`` rows of x on a GPU of ``capability``."""
    source = source or selected()
    if tokens <= source.fused_max_m:
        return "fused"
    if tokens <= source.tiled_max_m:
        return "wgmma" if capability == WGMMA_CAPABILITY else "tiled"
    return "dequant+cuBLAS"


def _split_count(tiles: int, k_blocks: int, wave: int, splits: int | None) -> tuple[int, int]:
    """(splits, k-blocks per split): one wave of resident blocks, since a grid larger than what
    is resident at once leaves a partial second wave, which ncu measured as up to half the time
    (8192^2, rank 32: 288 blocks for 264 slots); at least MIN_SPLIT_BLOCKS k-blocks a split."""
    if splits is None:
        splits = max(1, min(round(wave / tiles), k_blocks // MIN_SPLIT_BLOCKS))
    blocks_per_split = -(-k_blocks // splits)
    return -(-k_blocks // blocks_per_split), blocks_per_split


def _branch_item_count(pk: Prepacked, k_blocks: int, blocks_per_split: int, room: int, branch_items: int | None) -> int:
    """Down-projection items of a launch whose main items read ``blocks_per_split`` k-blocks of
    128 weight rows each, with ``room`` slots of the wave left beside them."""
    if not pk.rank:
        return 0
    if branch_items is not None:
        return max(1, min(branch_items, k_blocks))
    # Each down-projection item reads at most half the bytes of a main item's weights (A is
    # 16-bit, W 4-bit), so it finishes before the main items need t, and the items are made
    # larger still where needed to fit in the slots the main items leave in the wave: the
    # main items keep the split count of rank 0. Many small items (4 k-blocks each) cost
    # the main items a split at 8192^2 and made the branch +23% (docs/decisions/0002).
    r_pad = pk.lowrank_a.shape[0]
    item_blocks = max(1, ROWS_PER_BLOCK * blocks_per_split // (8 * r_pad))
    count = -(-k_blocks // item_blocks)
    return room if 0 < room < count else count


def fused_plan(pk: Prepacked, tokens: int, wave: int, shared_limit: int, splits: int | None = None,
               branch_items: int | None = None, source: KernelSource | None = None) -> dict[str, int]:
    """Grid decomposition of one fused launch of ``source``'s kernel for a GPU that holds ``wave``
    blocks at once and gives a block at most ``shared_limit`` bytes: token tile, K splits, branch
    items, blocks, and the block's dynamic shared memory. ``splits`` and ``branch_items`` override
    the rule (eval/bench_kernels.py sweeps them to set it)."""
    ring = ring_bytes(pk, source)
    token_tiles = token_tile(tokens)
    m_tiles = -(-tokens // (8 * token_tiles))
    k_blocks = -(-pk.in_features // K_BLOCK)
    row_tiles = -(-pk.out_features // ROW_TILE)
    row_blocks = -(-row_tiles // (ROWS_PER_BLOCK // ROW_TILE))
    tiles = row_blocks * m_tiles
    splits, blocks_per_split = _split_count(tiles, k_blocks, wave, splits)
    row_bytes = 8 * token_tiles * pk.dtype.itemsize  # one staged column of x
    if token_tiles <= WHOLE_SLICE_MAX_TILES:
        # The staged slice must fit in shared memory (next to the ring): split further if it does not.
        blocks_per_split = min(blocks_per_split, ((shared_limit - ring) // row_bytes - 8) // K_BLOCK)
    splits = -(-k_blocks // blocks_per_split)
    stride = max(blocks_per_split * K_BLOCK + 8, X_STRIDE) if token_tiles <= WHOLE_SLICE_MAX_TILES else X_STRIDE
    branch_items = _branch_item_count(pk, k_blocks, blocks_per_split, wave - tiles * splits, branch_items)
    return dict(token_tiles=token_tiles, m_tiles=m_tiles, tiles=tiles, splits=splits, blocks_per_split=blocks_per_split,
                branch_items=branch_items, blocks=branch_items + tiles * splits, shared=stride * row_bytes + ring)


def device_plan(pk: Prepacked, tokens: int, splits: int | None = None, branch_items: int | None = None,
                source: KernelSource | None = None) -> dict[str, int]:
    """``fused_plan`` for the GPU that holds ``pk``, with the wave its residency allows: the
    source's fixed blocks per multiprocessor, or CUDA's occupancy calculator on its compiled kernel."""
    source = source or selected()
    device, variant, token_tiles = pk.qweight.device.index, variant_of(pk), token_tile(tokens)
    shared_limit = _dynamic_shared_limit(source, variant, "linear", token_tiles, device)
    multiprocessors = _multiprocessors(device)
    if source.blocks_per_sm:
        return fused_plan(pk, tokens, source.blocks_per_sm * multiprocessors, shared_limit, splits, branch_items, source)

    def wave(shared: int) -> int:
        return multiprocessors * _resident_blocks(source, variant, "linear", token_tiles, shared, device)

    # The ring alone gives the most blocks per multiprocessor; a larger staged x slice can
    # lower that, and then the plan is remade for the wave that really fits.
    plan = fused_plan(pk, tokens, wave(ring_bytes(pk, source)), shared_limit, splits, branch_items, source)
    resident = wave(plan["shared"])
    if resident < plan["blocks"]:
        plan = fused_plan(pk, tokens, resident, shared_limit, splits, branch_items, source)
    return plan


def fused_linear(x: Tensor, pk: Prepacked, bias: Tensor | None, out: Tensor | None = None, splits: int | None = None,
                 branch_items: int | None = None, source: KernelSource | None = None) -> Tensor:
    """y [M, N] = x [M, K] through the fused kernel (any M; one launch)."""
    source = source or selected()
    plan = device_plan(pk, x.shape[0], splits, branch_items, source)
    return _launch(source, "linear", plan, 8 * plan["token_tiles"], x, pk, bias, out)


def gemm_token_tile(tokens: int) -> int:
    """The tiled kernel's MT: tiles of 64 tokens up to 64 tokens, of 128 above."""
    return GEMM_TOKEN_TILES[0] if tokens <= 16 * GEMM_TOKEN_TILES[0] else GEMM_TOKEN_TILES[-1]


def gemm_shared(pk: Prepacked, token_tiles: int) -> int:
    """Dynamic shared memory of a tiled block (each staged token row padded by 16 bytes)."""
    return _row_block_shared(pk, 16 * token_tiles, GEMM_X_STRIDE)


def _row_block_shared(pk: Prepacked, tile_tokens: int, x_row: int) -> int:
    """Dynamic shared memory of a block of 128 rows x ``tile_tokens`` tokens: its cp.async stages
    (each token's k-block of x taking ``x_row`` elements, then the weights and records), or where
    larger (with a branch) the staged t of its tokens, which also covers the down-projection items'
    x chunks."""
    itemsize = pk.dtype.itemsize
    stage = tile_tokens * x_row * itemsize + GEMM_ROW_TILES * 32 * 16 + GEMM_ROW_TILES * 8 * pk.records.shape[-1]
    return max(GEMM_STAGES * stage, tile_tokens * X_STRIDE * itemsize if pk.rank else 0)


def gemm_plan(pk: Prepacked, tokens: int, wave: int, splits: int | None = None,
              branch_items: int | None = None) -> dict[str, int]:
    """``fused_plan`` for the tiled kernel: blocks of 128 rows x 16 * MT tokens, split over K
    to fill the wave, and ``gemm_shared``."""
    token_tiles = gemm_token_tile(tokens)
    return _row_block_plan(pk, tokens, token_tiles, 16 * token_tiles, gemm_shared(pk, token_tiles), wave, splits, branch_items)


def wgmma_token_tile(tokens: int) -> int:
    """The wgmma kernel's MT (8 per 64-token wgmma): the fewest wgmmas that cover ``tokens``, at most 4."""
    return next(mt for mt in WGMMA_TOKEN_TILES if 8 * mt >= min(tokens, 8 * WGMMA_TOKEN_TILES[-1]))


def wgmma_shared(pk: Prepacked, token_tiles: int) -> int:
    """Dynamic shared memory of a wgmma block (x in core matrices, without padding)."""
    return _row_block_shared(pk, 8 * token_tiles, K_BLOCK)


def wgmma_plan(pk: Prepacked, tokens: int, wave: int, splits: int | None = None,
               branch_items: int | None = None) -> dict[str, int]:
    """``gemm_plan`` for the wgmma kernel: blocks of 128 rows x 8 * MT tokens."""
    token_tiles = wgmma_token_tile(tokens)
    return _row_block_plan(pk, tokens, token_tiles, 8 * token_tiles, wgmma_shared(pk, token_tiles), wave, splits, branch_items)


def _row_block_plan(pk: Prepacked, tokens: int, token_tiles: int, tile_tokens: int, shared: int, wave: int, splits: int | None,
                    branch_items: int | None) -> dict[str, int]:
    """The plan of a kernel whose blocks own 128 rows x ``tile_tokens`` tokens (tiled, wgmma)."""
    m_tiles = -(-tokens // tile_tokens)
    k_blocks = -(-pk.in_features // K_BLOCK)
    row_blocks = -(-pk.out_features // (ROW_TILE * GEMM_ROW_TILES))
    tiles = row_blocks * m_tiles
    splits, blocks_per_split = _split_count(tiles, k_blocks, wave, splits)
    branch_items = _branch_item_count(pk, k_blocks, blocks_per_split, wave - tiles * splits, branch_items)
    return dict(token_tiles=token_tiles, m_tiles=m_tiles, tiles=tiles, splits=splits, blocks_per_split=blocks_per_split,
                branch_items=branch_items, blocks=branch_items + tiles * splits, shared=shared)


# The kernels whose blocks own 128 rows: each family's token tile, shared memory and plan.
ROW_BLOCK_FAMILIES = {"gemm": (gemm_token_tile, gemm_shared, gemm_plan), "wgmma": (wgmma_token_tile, wgmma_shared, wgmma_plan)}


def device_row_block_plan(family: str, pk: Prepacked, tokens: int, splits: int | None = None,
                          branch_items: int | None = None, source: KernelSource | None = None) -> dict[str, int]:
    """``gemm_plan`` ("gemm") or ``wgmma_plan`` ("wgmma") for the GPU that holds ``pk``, with the
    wave its occupancy allows."""
    source = having(family, source)
    token_tile_of, shared_of, plan_of = ROW_BLOCK_FAMILIES[family]
    device, variant, token_tiles = pk.qweight.device.index, variant_of(pk), token_tile_of(tokens)
    resident = _resident_blocks(source, variant, family, token_tiles, shared_of(pk, token_tiles), device)
    return plan_of(pk, tokens, _multiprocessors(device) * resident, splits, branch_items)


def having(family: str, source: KernelSource | None = None) -> KernelSource:
    """``source`` (the selected one by default), which must have the kernel ``family``."""
    source = source or selected()
    if family not in source.families:
        others = ", ".join(f"{KERNEL_ENV}={name}" for name, other in SOURCES.items() if family in other.families)
        raise KernelUnavailable(f"the kernel source {source.name!r} ({source.filename}) has no {family!r} kernel; {others} has")
    return source


def tiled_input(x: Tensor, pk: Prepacked) -> Tensor:
    """x as the tiled kernel reads it: in prepacked column order, K a multiple of 8 (zero columns
    added: the padded weight columns meet zeros, as past K in the kernel) and 16-byte aligned."""
    if pk.perm is not None:
        x = x.index_select(1, pk.perm)
    if x.shape[1] % 8:
        x = torch.nn.functional.pad(x, (0, -x.shape[1] % 8))
    return x if x.data_ptr() % 16 == 0 else x.clone()


def tiled_linear(x: Tensor, pk: Prepacked, bias: Tensor | None, out: Tensor | None = None, splits: int | None = None,
                 branch_items: int | None = None, source: KernelSource | None = None) -> Tensor:
    """y [M, N] = x [M, K] through the tiled kernel (any M; one launch)."""
    source = having("gemm", source)
    plan = device_row_block_plan("gemm", pk, x.shape[0], splits, branch_items, source)
    return _launch(source, "gemm", plan, 16 * plan["token_tiles"], tiled_input(x, pk), pk, bias, out)


def wgmma_linear(x: Tensor, pk: Prepacked, bias: Tensor | None, out: Tensor | None = None, splits: int | None = None,
                 branch_items: int | None = None, source: KernelSource | None = None) -> Tensor:
    """y [M, N] = x [M, K] through the wgmma kernel (any M; one launch; Hopper only)."""
    source = having("wgmma", source)
    if torch.cuda.get_device_capability(x.device) != WGMMA_CAPABILITY:
        raise KernelUnavailable(f"the wgmma kernel needs an sm_90 GPU, not {torch.cuda.get_device_capability(x.device)}")
    plan = device_row_block_plan("wgmma", pk, x.shape[0], splits, branch_items, source)
    return _launch(source, "wgmma", plan, 8 * plan["token_tiles"], tiled_input(x, pk), pk, bias, out)


def kernel_arguments(family: str, plan: dict[str, int], tile_tokens: int, x: Tensor, pk: Prepacked, bias: Tensor | None,
                     y: Tensor, counters: Tensor) -> tuple:
    """The arguments of the fused, tiled or wgmma kernel in its parameter order, with the
    workspace ``plan`` needs: tensors (None for a null pointer), then numpy scalars."""
    m_pad = plan["m_tiles"] * tile_tokens
    n_pad = -(-pk.out_features // ROW_TILE) * ROW_TILE
    r_pad = 0 if pk.lowrank_a is None else pk.lowrank_a.shape[0]
    device = x.device
    split_part = torch.empty(plan["splits"] * m_pad * n_pad, dtype=torch.float32, device=device) if plan["splits"] > 1 else None
    t_part = torch.empty(plan["branch_items"] * m_pad * r_pad, dtype=torch.float32, device=device) if pk.rank else None
    t_final = torch.empty(m_pad * r_pad, dtype=x.dtype, device=device) if pk.rank else None
    # The tiled kernels take x already in prepacked column order, so they have no perm argument.
    inputs = (x, pk.perm) if family == "linear" else (x,)
    return inputs + (pk.qweight, pk.records, pk.lowrank_a, pk.lowrank_b, bias, y, counters, split_part, t_part, t_final,
                     numpy.int32(x.shape[0]), numpy.int32(pk.out_features), numpy.int32(x.shape[1]),
                     numpy.int32(pk.group_size), numpy.int32(pk.rank), numpy.int32(plan["splits"]),
                     numpy.int32(plan["blocks_per_split"]), numpy.int32(plan["branch_items"]), numpy.float32(pk.out_scale),
                     numpy.int32(pk.scale_shift))


def _launch(source: KernelSource, family: str, plan: dict[str, int], tile_tokens: int, x: Tensor, pk: Prepacked,
            bias: Tensor | None, out: Tensor | None) -> Tensor:
    """One launch of ``source``'s kernel ``family`` by ``plan``, with its workspace."""
    y = torch.empty(x.shape[0], pk.out_features, dtype=x.dtype, device=x.device) if out is None else out
    arguments = kernel_arguments(family, plan, tile_tokens, x, pk, bias, y, _counters(x.device, COUNTER_SLOTS + plan["tiles"]))
    kernel = _kernel(source, variant_of(pk), family, plan["token_tiles"])
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


def dequantize_prepacked(pk: Prepacked, source: KernelSource | None = None) -> Tensor:
    """The dense [N, K] weight (columns in prepacked order) in the activation dtype."""
    w = torch.empty(pk.out_features, pk.in_features, dtype=pk.dtype, device=pk.qweight.device)
    variant = variant_of(pk)
    kernel = load_module(variant, source).get_function(dequant_kernel_name(variant))
    with _stream(w.device):
        kernel((dequant_blocks(pk),), (DEQUANT_THREADS,), tuple(_arg(a) for a in dequant_arguments(pk, w)))
    return w


def dequantized_linear(x: Tensor, pk: Prepacked, bias: Tensor | None, source: KernelSource | None = None) -> Tensor:
    """The large-M path: dequantize, cuBLAS, then the branch as two small matmuls."""
    inputs = x if pk.perm is None else x[:, pk.perm.long()]
    y = inputs @ dequantize_prepacked(pk, source).T
    if pk.rank:
        y = y + (inputs @ pk.lowrank_a[:, : pk.in_features].T) @ pk.lowrank_b[: pk.out_features].T
    return y if bias is None else y + bias.to(y.dtype)


def linear(x: Tensor, pk: Prepacked, bias: Tensor | None) -> Tensor:
    """y = x W^T + B (A x) + b for x [..., K] on the GPU, through the selected source by its dispatch rule."""
    source = selected()
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    route = path(flat.shape[0], torch.cuda.get_device_capability(flat.device), source)
    if route == "fused":
        y = fused_linear(flat, pk, bias, source=source)
    elif route == "tiled":
        y = tiled_linear(flat, pk, bias, source=source)
    elif route == "wgmma":
        y = wgmma_linear(flat, pk, bias, source=source)
    else:
        y = dequantized_linear(flat, pk, bias, source)
    return y.reshape(*x.shape[:-1], pk.out_features)

"""The CUDA kernels of every source of kernels/ (launch.SOURCES), run on the CPU through
tests/cuda_emulator, against the float32 reference: their index arithmetic, fragment layouts,
shared-memory pipelines, split-K and branch protocol, on odd shapes, on every CI run. A GPU run
(test_kernels.py) stays the real check; this one runs where no GPU is lent."""

from __future__ import annotations

import pytest
import torch

import cuda_emulator as emulator
from llmcompress.config import QuantFormat
from llmcompress.cuda import launch
from llmcompress.cuda.prepack import Prepacked, prepack
from llmcompress.packing import LayerLayout
from test_kernels import (EVERY_ROW_BLOCK_KERNEL, EVERY_SOURCE, FORMATS, H100_SHARED, SOURCES, TOLERANCE, _emulate, _layer_tensors,
                          _reference, _relative_error)

pytestmark = pytest.mark.skipif(emulator.compiler() is None, reason="needs g++ to build the CUDA emulator")

H100_WAVE = 2 * 132  # the fused kernel: two resident blocks on each of 132 multiprocessors
H100_GEMM_WAVE = 132  # the tiled kernel: one


def _arguments_with_poisoned_workspace(build, *args) -> tuple:
    """``build(*args)``, with every tensor it allocates (the kernel's workspace) filled with NaN
    (or the largest integer), so a read of workspace the kernel never wrote shows."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory, torch.empty poisons
    try:
        return build(*args)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def emulated_linear(source: launch.KernelSource, family: str, x: torch.Tensor, pk: Prepacked, bias: torch.Tensor | None,
                    splits: int | None = None, branch_items: int | None = None,
                    schedule: str | emulator.Schedule = "late") -> torch.Tensor:
    """launch.fused_linear ("linear"), tiled_linear ("gemm") or wgmma_linear ("wgmma") of ``source``
    on the emulator, for an H100's wave and shared memory, into a NaN-poisoned output; the launch
    must leave its counters zeroed, as the next launch expects."""
    launch.having(family, source)
    if family == "linear":
        plan = launch.fused_plan(pk, x.shape[0], H100_WAVE, H100_SHARED, splits, branch_items, source)
        tile_tokens = 8 * plan["token_tiles"]
    elif family == "gemm":
        plan = launch.gemm_plan(pk, x.shape[0], H100_GEMM_WAVE, splits, branch_items)
        tile_tokens = 16 * plan["token_tiles"]
        x = launch.tiled_input(x, pk)
    else:
        plan = launch.wgmma_plan(pk, x.shape[0], H100_GEMM_WAVE, splits, branch_items)
        tile_tokens = 8 * plan["token_tiles"]
        x = launch.tiled_input(x, pk)
    y = torch.full((x.shape[0], pk.out_features), float("nan"), dtype=x.dtype)
    counters = torch.zeros(launch.COUNTER_SLOTS + plan["tiles"], dtype=torch.int32)
    arguments = _arguments_with_poisoned_workspace(launch.kernel_arguments, family, plan, tile_tokens, x, pk, bias, y,
                                                   counters)
    variant = launch.variant_of(pk)
    emulator.run(source, variant, launch.kernel_name(variant, family, plan["token_tiles"]), plan["blocks"], launch.THREADS,
                 plan["shared"], arguments, schedule)
    assert not counters.any(), f"the launch left its counters at {counters.tolist()}"
    return y


def _check(y: torch.Tensor, ref: torch.Tensor, case: str) -> None:
    error = _relative_error(y, ref)
    assert torch.isfinite(y).all() and error < TOLERANCE[y.dtype], f"{case}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", sorted(FORMATS))
@EVERY_SOURCE
def test_emulated_fused_kernel_matches_float32_reference(name: str, dtype: torch.dtype, source: launch.KernelSource) -> None:
    """Every format and activation type, with and without the branch, for each token tile of the
    source's fused kernel (1, 2 and 8 tiles of 8 tokens: M = 1, 3, 16, 70) and, where it has them,
    of the tiled kernel (64 and 128 tokens: M = 16, 70) and of the wgmma kernel (64, 128 and 256
    tokens: M = 16, 70, 150), on a layer with a partial row tile and K not a multiple of the
    64-column k-block."""
    fmt = FORMATS[name]
    for seed, rank in enumerate((0, 24)):
        tensors, weight, branch = _layer_tensors(100, 1000, fmt, rank, seed)
        pk = prepack(tensors, fmt, 1000, LayerLayout(rank=rank), dtype)
        bias = torch.randn(100).to(dtype)
        for tokens in (1, 3, 16, 70, 150):
            x = torch.randn(tokens, 1000).to(dtype)
            ref = _reference(x, weight, branch, bias)
            if tokens < 150:
                _check(emulated_linear(source, "linear", x, pk, bias), ref, f"fused r={rank} M={tokens}")
            if "gemm" in source.families and tokens in (16, 70):
                _check(emulated_linear(source, "gemm", x, pk, bias), ref, f"tiled r={rank} M={tokens}")
            if "wgmma" in source.families and tokens >= 16:
                _check(emulated_linear(source, "wgmma", x, pk, bias), ref, f"wgmma r={rank} M={tokens}")


@pytest.mark.parametrize("schedule", sorted(emulator.SCHEDULES))
@pytest.mark.parametrize(("splits", "branch_items"), [(1, None), (2, 1), (3, 5), (7, 1000)])
@EVERY_SOURCE
def test_emulated_fused_split_k_branch_items_and_odd_shapes(splits: int, branch_items: int | None, schedule: str,
                                                            source: launch.KernelSource) -> None:
    """The GPU test's overrides (split counts, branch item counts past the last k-block) with
    act-order columns, K = 1003 and a misaligned x, under each emulated schedule."""
    for fmt, shape, act_order, tokens in ((QuantFormat(bits=4, group_size=32), (100, 200), True, 5),
                                          (QuantFormat(bits=4, group_size=-1), (40, 1003), False, 16),
                                          (QuantFormat(kind="nvfp4"), (24, 1040), False, 70)):
        tensors, weight, branch = _layer_tensors(*shape, fmt, rank=24, seed=splits, act_order=act_order)
        pk = prepack(tensors, fmt, shape[1], LayerLayout(rank=24), torch.float16)
        x = torch.randn(tokens * shape[1] + 1).half()[1:].view(tokens, shape[1])  # 2-byte aligned
        bias = torch.randn(shape[0]).half()
        y = emulated_linear(source, "linear", x, pk, bias, splits=splits, branch_items=branch_items, schedule=schedule)
        _check(y, _reference(x, weight, branch, bias), f"{fmt.describe()} {shape} M={tokens}")


@pytest.mark.parametrize("schedule", sorted(emulator.SCHEDULES))
@pytest.mark.parametrize(("splits", "branch_items"), [(1, None), (2, 1), (3, 5), (7, 1000)])
@EVERY_ROW_BLOCK_KERNEL
def test_emulated_tiled_split_k_branch_items_and_odd_shapes(splits: int, branch_items: int | None, schedule: str,
                                                            source: launch.KernelSource, family: str) -> None:
    """test_kernels.py's tiled GPU test on the emulator, for the tiled and the wgmma kernel:
    act-order columns gathered, K = 1003 padded, a misaligned x copied, token counts across one
    and several tiles of each size."""
    for fmt, shape, act_order in ((QuantFormat(bits=4, group_size=32), (100, 200), True),
                                  (QuantFormat(bits=4, group_size=-1), (40, 1003), False),
                                  (QuantFormat(kind="nvfp4"), (136, 1040), False)):
        tensors, weight, branch = _layer_tensors(*shape, fmt, rank=24, seed=splits, act_order=act_order)
        pk = prepack(tensors, fmt, shape[1], LayerLayout(rank=24), torch.float16)
        bias = torch.randn(shape[0]).half()
        for tokens in (5, 70, 150):
            x = torch.randn(tokens * shape[1] + 1).half()[1:].view(tokens, shape[1])  # 2-byte aligned
            y = emulated_linear(source, family, x, pk, bias, splits=splits, branch_items=branch_items, schedule=schedule)
            _check(y, _reference(x, weight, branch, bias), f"{fmt.describe()} {shape} M={tokens}")


EVERY_KERNEL = [(source, family) for source in SOURCES for family in source.families]


@pytest.mark.parametrize(("source", "family"), EVERY_KERNEL, ids=[f"{source.name}-{family}" for source, family in EVERY_KERNEL])
def test_emulated_blocks_in_any_interleaving_give_the_same_bits(source: launch.KernelSource, family: str) -> None:
    """The last split to finish a tile sums the splits' partials in split order, whichever block
    that is, so blocks running together in turns shuffled by different seeds give the
    one-at-a-time output bit for bit: the GPU test's determinism, as far as interleavings go.
    (Summing from the finisher's own split instead changed 3 to 7 of the NVFP4 case's 17920 outputs.)"""
    for fmt, shape, act_order, tokens, splits, branch_items in (
            (QuantFormat(bits=4, group_size=32), (100, 520), True, 5, 3, 5),
            (QuantFormat(kind="nvfp4"), (256, 1040), False, 70, 7, 3)):
        tensors, _, _ = _layer_tensors(*shape, fmt, rank=24, seed=1, act_order=act_order)
        pk = prepack(tensors, fmt, shape[1], LayerLayout(rank=24), torch.float16)
        x, bias = torch.randn(tokens, shape[1]).half(), torch.randn(shape[0]).half()
        one_at_a_time = emulated_linear(source, family, x, pk, bias, splits, branch_items)
        for resident, seed in ((3, 1), (8, 2), (8, 3)):
            together = emulated_linear(source, family, x, pk, bias, splits, branch_items,
                                       emulator.Schedule(resident=resident, seed=seed))
            assert torch.equal(together, one_at_a_time), f"{fmt.describe()}: {resident} resident blocks, seed {seed}"


@pytest.mark.parametrize("name", ["int4-asym-g32", "nvfp4", "mxfp4"])
@EVERY_SOURCE
def test_emulated_dequantizer_writes_the_contract_weight(name: str, source: launch.KernelSource) -> None:
    """The large-M path's dequantizer against the layout contract's own decoding (_emulate)."""
    fmt = FORMATS[name]
    tensors, _, _ = _layer_tensors(100, 1000, fmt, rank=0, seed=7)
    pk = prepack(tensors, fmt, 1000, LayerLayout(), torch.float16)
    w = torch.full((100, 1000), float("nan"), dtype=torch.float16)
    variant = launch.variant_of(pk)
    emulator.run(source, variant, launch.dequant_kernel_name(variant), launch.dequant_blocks(pk), launch.DEQUANT_THREADS, 0,
                 launch.dequant_arguments(pk, w))
    torch.testing.assert_close(w.float(), _emulate(pk), rtol=2**-10, atol=2**-24)

"""The fused CUDA kernels: the prepacked layout (checked on the CPU against the kernel contract),
the launch plans, dispatch and choice of kernel source, and, on a GPU with CuPy, every kernel of
every source (launch.SOURCES) against the float32 reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmcompress.actformat import ActFormat
from llmcompress.config import QuantFormat
from llmcompress.cuda import launch
from llmcompress.errors import ConfigError
from llmcompress.formats import E2M1_VALUES, dequantize, quantize
from llmcompress.methods.lowrank import LowRank
from llmcompress.nn import CompressedLinear
from llmcompress.packing import LayerLayout, pack_branch, pack_weight
from llmcompress.cuda.prepack import (FP4_NIBBLE, FRAGMENT_COL, FRAGMENT_ROW, INT4_MAGIC, INT4_NIBBLE, K_BLOCK, Prepacked,
                                      Unsupported, prepack)

FORMATS = {
    "int4-asym-g128": QuantFormat(bits=4, group_size=128),
    "int4-sym-g128": QuantFormat(bits=4, group_size=128, symmetric=True),
    "int4-asym-g32": QuantFormat(bits=4, group_size=32),
    "int4-sym-g64": QuantFormat(bits=4, group_size=64, symmetric=True),
    "nvfp4": QuantFormat(kind="nvfp4"),
    "mxfp4": QuantFormat(kind="mxfp4"),
}
SOURCES = list(launch.SOURCES.values())
# Each test of a launch path runs for every source that has it, named by its LLMCOMPRESS_KERNEL value.
EVERY_SOURCE = pytest.mark.parametrize("source", SOURCES, ids=[source.name for source in SOURCES])
ROW_BLOCK_KERNELS = [(source, family) for source in SOURCES for family in source.families if family != "linear"]
EVERY_ROW_BLOCK_KERNEL = pytest.mark.parametrize(("source", "family"), ROW_BLOCK_KERNELS,
                                                 ids=[f"{source.name}-{family}" for source, family in ROW_BLOCK_KERNELS])


def _layer_tensors(out_features: int, in_features: int, fmt: QuantFormat, rank: int, seed: int, device: str = "cpu",
                   act_order: bool = False) -> tuple[dict, torch.Tensor, LowRank | None]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    q = quantize(weight, fmt)
    if act_order:
        # GPTQ's dynamic groups: group g holds a permuted run of group_size columns.
        order = torch.randperm(in_features, generator=gen)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_features) // fmt.group_size).to(torch.int32)
        q = type(q)(codes=q.codes, scales=q.scales, zeros=q.zeros, global_scale=q.global_scale, g_idx=g_idx)
    tensors = pack_weight(q, fmt)
    branch = None
    if rank:
        branch = LowRank(a=torch.randn(rank, in_features, generator=gen) * 0.05, b=torch.randn(out_features, rank, generator=gen) * 0.05)
        tensors.update(pack_branch(branch.a, branch.b, "float16"))
    tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors, dequantize(q, fmt).to(device), branch


def _emulate(pk) -> torch.Tensor:
    """The float32 weight [N, K] (prepacked column order) that the kernel contract says the
    prepacked tensors hold, decoded by the contract's rules rather than the kernel's bit tricks."""
    rt, kb = pk.qweight.shape[:2]
    words = pk.qweight.long() & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF  # [RT, KB, 32, 4, 8]
    order = INT4_NIBBLE if pk.kind.startswith("int4") else FP4_NIBBLE
    elements = nibbles[..., list(order)]
    lane = torch.arange(32)
    rows = (lane // 4).unsqueeze(1) + torch.tensor(FRAGMENT_ROW)
    cols = (2 * (lane % 4)).unsqueeze(1) + torch.tensor(FRAGMENT_COL)
    tiles = torch.zeros(rt, kb, 4, 16, 16, dtype=torch.long)
    tiles[:, :, :, rows, cols] = elements.permute(0, 1, 3, 2, 4)
    codes = tiles.permute(0, 3, 1, 2, 4).reshape(rt * 16, kb * K_BLOCK)
    row = torch.arange(rt * 16).unsqueeze(1)
    col = torch.arange(kb * K_BLOCK).unsqueeze(0)
    gpb = max(1, K_BLOCK // pk.group_size)
    j = (col % K_BLOCK) // pk.group_size if gpb > 1 else torch.zeros_like(col)
    # Record of (row tile, k-block, g): [values[0] of rows g, g+8][GPB], then values[1] likewise.
    record = pk.records[row // 16, col // K_BLOCK, row % 8]  # [Npad, Kpad, bytes]
    slot = ((row % 16) // 8) * gpb + j
    if pk.kind.startswith("int4"):
        values16 = record.view(pk.dtype).float()  # [Npad, Kpad, 2 * 2 * GPB]
        scale = values16.gather(-1, slot.expand_as(codes).unsqueeze(-1)).squeeze(-1)
        zero = values16.gather(-1, (slot + 2 * gpb).expand_as(codes).unsqueeze(-1)).squeeze(-1) - INT4_MAGIC[pk.dtype]
        values = (codes.float() - zero) * scale
    else:
        scale = record.gather(-1, slot.expand_as(codes).unsqueeze(-1)).squeeze(-1)
        magnitude = torch.tensor(E2M1_VALUES)[codes & 7]
        values = torch.where(codes >= 8, -magnitude, magnitude)
        if pk.kind == "nvfp4":
            values = values * scale.view(torch.float8_e4m3fn).float() / 256 * pk.out_scale
        else:
            values = values * torch.exp2(scale.float() - pk.scale_shift - 127) * pk.out_scale
    return values[: pk.out_features, : pk.in_features]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(48, 128), (100, 200), (16, 576)])
def test_prepacked_layout_holds_the_weight(name: str, shape: tuple[int, int]) -> None:
    fmt = FORMATS[name]
    tensors, weight, _ = _layer_tensors(*shape, fmt, rank=0, seed=1)
    pk = prepack(tensors, fmt, shape[1], LayerLayout(), torch.bfloat16 if name == "nvfp4" else torch.float16)
    torch.testing.assert_close(_emulate(pk), weight, rtol=2**-8, atol=0)


def test_prepack_sorts_act_order_columns_and_the_branch_with_them() -> None:
    fmt = QuantFormat(bits=4, group_size=32)
    tensors, weight, branch = _layer_tensors(64, 160, fmt, rank=8, seed=2, act_order=True)
    pk = prepack(tensors, fmt, 160, LayerLayout(rank=8), torch.float16)
    perm = pk.perm.long()
    torch.testing.assert_close(_emulate(pk), weight[:, perm], rtol=2**-10, atol=0)
    torch.testing.assert_close(pk.lowrank_a[:8, :160].float(), branch.a[:, perm].half().float())
    assert pk.lowrank_a.shape == (16, 192) and pk.lowrank_b.shape == (64, 16)


@pytest.mark.parametrize("fmt, layout, dtype, reason", [
    (QuantFormat(bits=3, group_size=128), LayerLayout(), torch.float16, "INT3"),
    (QuantFormat(bits=4, group_size=48), LayerLayout(), torch.float16, "group size 48"),
    (QuantFormat(bits=4, group_size=16), LayerLayout(), torch.float16, "group size 16"),
    (QuantFormat(bits=4, group_size=128), LayerLayout(), torch.float32, "float32"),
    (QuantFormat(bits=4, group_size=128), LayerLayout(smoothed=True), torch.float16, "smoothing"),
    (QuantFormat(bits=4, group_size=128), LayerLayout(act_format=ActFormat(kind="int", bits=4, group_size=64)),
     torch.float16, "W4A4"),
])
def test_prepack_names_what_the_kernel_does_not_cover(fmt, layout, dtype, reason) -> None:
    tensors, _, _ = _layer_tensors(32, 192, fmt, rank=0, seed=3)
    if layout.smoothed:
        tensors["smooth_scale"] = torch.ones(192)
    with pytest.raises(Unsupported, match=reason):
        prepack(tensors, fmt, 192, layout, dtype)


def test_compressed_linear_on_cpu_never_touches_the_kernels() -> None:
    fmt = FORMATS["int4-asym-g128"]
    tensors, weight, _ = _layer_tensors(32, 128, fmt, rank=0, seed=4)
    layer = CompressedLinear(128, 32, fmt)
    layer.load_state_dict(tensors, strict=False)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-4, atol=1e-5)
    assert layer._kernel_cache == {}


def _plan_layer(out_features: int, in_features: int, rank: int, kind: str = "int4") -> Prepacked:
    """A layer of this shape as the launch plan sees it: the plan reads shapes, never values,
    so the tensors are zero-stride views (a 28672 x 8192 layer costs nothing)."""
    row_tiles, k_blocks = -(-out_features // 16), -(-in_features // K_BLOCK)
    record_bytes = 16 if kind == "int4g32" else 8
    r_pad = -(-rank // 16) * 16
    return Prepacked(
        kind=kind, dtype=torch.float16, out_features=out_features, in_features=in_features, group_size=128, rank=rank,
        qweight=torch.zeros(1, 1, 1, 4, dtype=torch.int32).expand(row_tiles, k_blocks, 32, 4),
        records=torch.zeros(1, 1, 1, record_bytes, dtype=torch.uint8).expand(row_tiles, k_blocks, 8, record_bytes),
        perm=None, lowrank_a=torch.zeros(1, 1, dtype=torch.float16).expand(r_pad, k_blocks * K_BLOCK) if rank else None,
        lowrank_b=torch.zeros(1, 1, dtype=torch.float16).expand(row_tiles * 16, r_pad) if rank else None,
        out_scale=1.0, scale_shift=0)


H100_SHARED = 232448 - 16  # shared_memory_per_block_optin, less the kernel's static flags


def _assert_sound_plan(plan: dict, k_blocks: int, tile_tokens: int, tokens: int, rank: int, shared_limit: int, case: str) -> None:
    """Every split holds at least one k-block and together they hold all of K, the token tiles
    cover the tokens, the grid counts every item, and shared memory fits."""
    assert plan["splits"] * plan["blocks_per_split"] >= k_blocks, case
    assert (plan["splits"] - 1) * plan["blocks_per_split"] < k_blocks, case
    assert plan["shared"] <= shared_limit, case
    assert plan["m_tiles"] * tile_tokens >= tokens, case
    assert plan["blocks"] == plan["tiles"] * plan["splits"] + plan["branch_items"], case
    assert (plan["branch_items"] > 0) == (rank > 0), case


@pytest.mark.parametrize("shared_limit", [H100_SHARED, 101376 - 16], ids=["sm90", "sm89"])
@pytest.mark.parametrize("wave", [264, 528, 660])
@pytest.mark.parametrize("kind", ["int4", "int4g32"])
@EVERY_SOURCE
def test_launch_plan_covers_k_and_fits_shared_memory(kind: str, wave: int, shared_limit: int, source: launch.KernelSource) -> None:
    for out_features, in_features in [(576, 576), (4096, 4096), (8192, 8192), (11008, 4096), (4096, 11008),
                                      (28672, 8192), (100, 200), (48, 1000)]:
        for rank in (0, 32, 64):
            pk = _plan_layer(out_features, in_features, rank, kind)
            k_blocks = -(-in_features // K_BLOCK)
            for tokens in (1, 3, 16, 64, 129):
                for splits in (None, 1, 7):
                    plan = launch.fused_plan(pk, tokens, wave, shared_limit, splits, source=source)
                    case = f"{out_features}x{in_features} r={rank} M={tokens} splits={splits}: {plan}"
                    _assert_sound_plan(plan, k_blocks, 8 * plan["token_tiles"], tokens, rank, shared_limit, case)


@pytest.mark.parametrize("shared_limit", [H100_SHARED, 101376 - 16], ids=["sm90", "sm89"])
@pytest.mark.parametrize("kind", ["int4", "int4g32"])
def test_tiled_plan_covers_k_and_tokens_and_fits_shared_memory(kind: str, shared_limit: int) -> None:
    for out_features, in_features in [(576, 576), (8192, 8192), (11008, 4096), (4096, 11008), (100, 200), (48, 1000)]:
        for rank in (0, 32, 256):
            pk = _plan_layer(out_features, in_features, rank, kind)
            k_blocks = -(-in_features // K_BLOCK)
            for tokens in (17, 64, 65, 129, 256, 1000):
                for splits in (None, 1, 7):
                    plan = launch.gemm_plan(pk, tokens, 132, splits)
                    case = f"{out_features}x{in_features} r={rank} M={tokens} splits={splits}: {plan}"
                    _assert_sound_plan(plan, k_blocks, 16 * plan["token_tiles"], tokens, rank, shared_limit, case)


@pytest.mark.parametrize("kind", ["int4", "int4g32", "nvfp4"])
def test_wgmma_plan_covers_k_and_tokens_and_fits_shared_memory(kind: str) -> None:
    """The wgmma kernel runs only on Hopper, so only the H100's shared memory applies."""
    for out_features, in_features in [(576, 576), (8192, 8192), (11008, 4096), (4096, 11008), (100, 200), (48, 1000)]:
        for rank in (0, 32, 256):
            pk = _plan_layer(out_features, in_features, rank, kind)
            k_blocks = -(-in_features // K_BLOCK)
            for tokens in (17, 64, 65, 129, 256, 257, 1000):
                for splits in (None, 1, 7):
                    plan = launch.wgmma_plan(pk, tokens, 132, splits)
                    case = f"{out_features}x{in_features} r={rank} M={tokens} splits={splits}: {plan}"
                    _assert_sound_plan(plan, k_blocks, 8 * plan["token_tiles"], tokens, rank, H100_SHARED, case)


def test_tiled_input_gathers_act_order_columns_pads_k_and_aligns() -> None:
    """What the tiled kernel requires of x (no perm, K % 8 == 0, 16-byte aligned), built on the CPU."""
    fmt = QuantFormat(bits=4, group_size=32)
    tensors, _, _ = _layer_tensors(100, 200, fmt, rank=0, seed=3, act_order=True)
    pk = prepack(tensors, fmt, 200, LayerLayout(), torch.float16)
    x = torch.randn(3 * 200 + 1).half()[1:].view(3, 200)  # 2-byte aligned
    assert torch.equal(launch.tiled_input(x, pk), x[:, pk.perm.long()])
    plain = _plan_layer(40, 1003, 0)
    x = torch.randn(3 * 1003 + 1).half()[1:].view(3, 1003)
    padded = launch.tiled_input(x, plain)
    assert padded.shape == (3, 1008) and padded.data_ptr() % 16 == 0
    assert torch.equal(padded[:, :1003], x) and not padded[:, 1003:].any()
    aligned = torch.randn(3, 1008).half()
    assert launch.tiled_input(aligned, plain).data_ptr() == aligned.data_ptr()


def test_dispatch_takes_each_path_in_its_range() -> None:
    """The default source (the measured kernel): fused up to 64 tokens, then dequantize + cuBLAS,
    on any GPU. The tiled source: fused up to 16, then the tiled kernel (wgmma on Hopper, built
    for sm_90a there) up to 1024, then dequantize + cuBLAS."""
    default, tiled, hopper = launch.SOURCES["default"], launch.SOURCES["tiled"], launch.WGMMA_CAPABILITY
    for capability in (launch.MIN_CAPABILITY, hopper):
        assert [launch.path(m, capability, default) for m in (1, 64, 65, 1024)] == ["fused", "fused"] + ["dequant+cuBLAS"] * 2
        assert launch.WGMMA_ARCH not in launch.module_options("int4_f16", capability, default)
    assert [launch.path(m, source=tiled) for m in (1, 16, 17, 1024, 1025)] == ["fused", "fused", "tiled", "tiled", "dequant+cuBLAS"]
    assert [launch.path(m, hopper, tiled) for m in (16, 17, 1024, 1025)] == ["fused", "wgmma", "wgmma", "dequant+cuBLAS"]
    assert launch.gemm_token_tile(64) == 4 and launch.gemm_token_tile(65) == 8
    assert [launch.wgmma_token_tile(m) for m in (17, 64, 65, 128, 129, 1000)] == [8, 8, 16, 16, 32, 32]
    assert launch.WGMMA_ARCH in launch.module_options("int4_f16", hopper, tiled)
    assert launch.WGMMA_ARCH not in launch.module_options("int4_f16", (8, 9), tiled)


def test_the_environment_picks_the_kernel_source_and_default_is_the_measured_one(monkeypatch) -> None:
    monkeypatch.delenv(launch.KERNEL_ENV, raising=False)
    assert launch.selected() is launch.SOURCES["default"] and launch.selected().filename == "w4_linear.cu"
    assert launch.FUSED_MAX_M == 64
    for value, name in (("tiled", "tiled"), (" tiled ", "tiled"), ("", "default"), ("default", "default")):
        monkeypatch.setenv(launch.KERNEL_ENV, value)
        assert launch.selected() is launch.SOURCES[name]
    monkeypatch.setenv(launch.KERNEL_ENV, "tiled")
    assert (launch.FUSED_MAX_M, launch.TILED_MAX_M, launch.path(17)) == (16, 1024, "tiled")
    monkeypatch.setenv(launch.KERNEL_ENV, "wgmma")
    with pytest.raises(ConfigError, match="LLMCOMPRESS_KERNEL='wgmma' names no kernel source: choose one of default, tiled"):
        launch.selected()
    with pytest.raises(ConfigError):  # before any GPU or CuPy is looked for: a typo is not a fallback
        launch.check_cupy()
    with pytest.raises(launch.KernelUnavailable, match="LLMCOMPRESS_KERNEL=tiled has"):
        launch.having("gemm", launch.SOURCES["default"])


def test_every_kernel_file_is_a_source_and_its_text_holds_the_shared_header() -> None:
    """Each kernels/*.cu is a source the loader can select (CI compiles each of them, and the wheel
    carries them: tests/test_packaging.py); the text the loader compiles has its header inlined."""
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    assert sorted(path.name for path in kernels.glob("*.cu")) == sorted(source.filename for source in SOURCES)
    header = (kernels / "w4_common.cuh").read_text()
    for source in SOURCES:
        assert source.path == kernels / source.filename
        text = launch.kernel_text(source)
        assert '#include "' not in text and header in text
        assert '#include "w4_common.cuh"' in source.path.read_text()


@EVERY_SOURCE
def test_launch_plan_takes_the_benchmarks_branch_item_count(source: launch.KernelSource) -> None:
    """eval/bench_kernels.py --sweep-branch sets the item count: it is kept, clamped to 1..K's
    k-blocks, and counted in the grid; at rank 0 there are no items whatever is asked."""
    k_blocks = 11008 // K_BLOCK
    for items, expected in ((5, 5), (0, 1), (10_000, k_blocks)):
        plan = launch.fused_plan(_plan_layer(4096, 11008, 32), 1, 264, H100_SHARED, splits=6, branch_items=items, source=source)
        assert (plan["splits"], plan["branch_items"]) == (6, expected)
        assert plan["blocks"] == plan["tiles"] * 6 + expected
    assert launch.fused_plan(_plan_layer(4096, 11008, 0), 1, 264, H100_SHARED, branch_items=5, source=source)["branch_items"] == 0


def test_launch_plan_keeps_the_measured_h100_decomposition() -> None:
    """8192^2, rank 32, M = 1 with two blocks per multiprocessor (v6's residency): 4 splits and
    8 down-projection items of 16 k-blocks, the plan kernels/NOTES.md measured at +10%."""
    plan = launch.fused_plan(_plan_layer(8192, 8192, 32), 1, 2 * 132, H100_SHARED, source=launch.SOURCES["default"])
    assert (plan["splits"], plan["blocks_per_split"], plan["branch_items"], plan["blocks"]) == (4, 32, 8, 264)


# ----------------------------------------------------------------------------- on a GPU

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and CuPy")

GPU_SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096), (4096, 11008)]
GPU_TOKENS = [1, 3, 16, 64, 129]
GPU_RANKS = [0, 16, 32, 64]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


ROW_BLOCK_LAUNCH = {"gemm": launch.tiled_linear, "wgmma": launch.wgmma_linear}


def _hopper() -> bool:
    return torch.cuda.get_device_capability() == launch.WGMMA_CAPABILITY


def _row_block_families_here(source: launch.KernelSource) -> list[str]:
    """The source's tiled kernels that this GPU runs (wgmma only on Hopper)."""
    return [family for family in source.families if family in ROW_BLOCK_LAUNCH and (family != "wgmma" or _hopper())]


def _reference(x: torch.Tensor, weight: torch.Tensor, branch: LowRank | None, bias: torch.Tensor) -> torch.Tensor:
    y = x.float() @ weight.float().T + bias.float()
    if branch is not None:
        a, b = branch.a.half().float().to(x.device), branch.b.half().float().to(x.device)
        y = y + (x.float() @ a.T) @ b.T
    return y


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", sorted(FORMATS))
@EVERY_SOURCE
def test_fused_kernel_matches_float32_reference(name: str, dtype: torch.dtype, source: launch.KernelSource, monkeypatch) -> None:
    """Every kernel of the source, and its dispatch (launch.linear, the source selected through
    LLMCOMPRESS_KERNEL), on every format, dtype, shape, rank and token count."""
    monkeypatch.setenv(launch.KERNEL_ENV, source.name)
    fmt = FORMATS[name]
    failures = []
    seed = 0
    for out_features, in_features in GPU_SHAPES:
        for rank in GPU_RANKS:
            seed += 1
            tensors, weight, branch = _layer_tensors(out_features, in_features, fmt, rank, seed, device="cuda")
            pk = prepack(tensors, fmt, in_features, LayerLayout(rank=rank), dtype)
            bias = torch.randn(out_features, device="cuda").to(dtype)
            for tokens in GPU_TOKENS:
                x = torch.randn(tokens, in_features, device="cuda").to(dtype)
                ref = _reference(x, weight, branch, bias)
                # Poisoned outputs: every element must be written.
                out = torch.full((tokens, out_features), float("nan"), dtype=dtype, device="cuda")
                results = [("fused", launch.fused_linear(x, pk, bias, out=out, source=source)),
                           ("dispatch", launch.linear(x, pk, bias))]
                for family in _row_block_families_here(source):
                    results.append((family, ROW_BLOCK_LAUNCH[family](x, pk, bias, out=torch.full_like(out, float("nan")),
                                                                     source=source)))
                for path, result in results:
                    error = _relative_error(result, ref)
                    if not torch.isfinite(result).all() or error > TOLERANCE[dtype]:
                        failures.append(f"{path} N={out_features} K={in_features} r={rank} M={tokens}: error {error:.2e}")
    assert not failures, "\n".join(failures[:20])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("splits", "branch_items"), [(1, None), (2, 1), (3, 5), (7, 1000)])
@EVERY_SOURCE
def test_split_k_branch_items_and_odd_shapes_agree(splits: int, branch_items: int | None, source: launch.KernelSource) -> None:
    """Any split count and any branch item count (the benchmark's sweeps), including items past
    the last k-block, which sum nothing."""
    for fmt, shape, act_order in ((QuantFormat(bits=4, group_size=32), (100, 200), True),
                                  (QuantFormat(bits=4, group_size=-1), (48, 1000), False),
                                  (QuantFormat(kind="nvfp4"), (24, 1040), False)):
        tensors, weight, branch = _layer_tensors(*shape, fmt, rank=24, seed=splits, device="cuda", act_order=act_order)
        pk = prepack(tensors, fmt, shape[1], LayerLayout(rank=24), torch.float16)
        x = torch.randn(5, shape[1], device="cuda").half()
        bias = torch.zeros(shape[0], device="cuda").half()
        y = launch.fused_linear(x, pk, bias, splits=splits, branch_items=branch_items, source=source)
        assert _relative_error(y, _reference(x, weight, branch, bias)) < 2e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("splits", "branch_items"), [(1, None), (2, 1), (3, 5), (7, 1000)])
@EVERY_ROW_BLOCK_KERNEL
def test_tiled_kernel_on_odd_shapes_and_act_order(splits: int, branch_items: int | None, source: launch.KernelSource,
                                                  family: str) -> None:
    """The tiled and the wgmma kernels' own input handling: act-order columns gathered, K not a
    multiple of 8 padded, a misaligned x copied; token counts across one and several tiles of each size."""
    if family == "wgmma" and not _hopper():
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    run = ROW_BLOCK_LAUNCH[family]

    for fmt, shape, act_order in ((QuantFormat(bits=4, group_size=32), (100, 200), True),
                                  (QuantFormat(bits=4, group_size=-1), (40, 1003), False),
                                  (QuantFormat(kind="nvfp4"), (136, 1040), False)):
        tensors, weight, branch = _layer_tensors(*shape, fmt, rank=24, seed=splits, device="cuda", act_order=act_order)
        pk = prepack(tensors, fmt, shape[1], LayerLayout(rank=24), torch.float16)
        bias = torch.randn(shape[0], device="cuda").half()
        for tokens in (5, 70, 150):
            x = torch.randn(tokens * shape[1] + 1, device="cuda").half()[1:].view(tokens, shape[1])  # 2-byte aligned
            out = torch.full((tokens, shape[0]), float("nan"), dtype=torch.float16, device="cuda")
            y = run(x, pk, bias, out=out, splits=splits, branch_items=branch_items, source=source)
            error = _relative_error(y, _reference(x, weight, branch, bias))
            assert torch.isfinite(y).all() and error < 2e-3, f"{fmt.describe()} {shape} M={tokens}: {error:.2e}"


def _gpu_layer(out_features: int, in_features: int, rank: int, seed: int) -> tuple[Prepacked, torch.Tensor, LowRank | None]:
    """An INT4 g128 layer on the GPU, prepacked for float16, with its dequantized weight and branch."""
    fmt = FORMATS["int4-asym-g128"]
    tensors, weight, branch = _layer_tensors(out_features, in_features, fmt, rank, seed, device="cuda")
    return prepack(tensors, fmt, in_features, LayerLayout(rank=rank), torch.float16), weight, branch


@gpu
@pytest.mark.gpu
@EVERY_SOURCE
def test_one_split_too_wide_for_shared_memory_is_split_by_the_plan(source: launch.KernelSource) -> None:
    """16 tokens of K = 11008 in one split would stage 352 KB of x: the plan splits K instead."""
    pk, weight, branch = _gpu_layer(256, 11008, rank=16, seed=8)
    x = torch.randn(16, 11008, device="cuda").half()
    bias = torch.zeros(256, device="cuda").half()
    assert launch.device_plan(pk, 16, splits=1, source=source)["splits"] > 1
    y = launch.fused_linear(x, pk, bias, splits=1, source=source)
    assert _relative_error(y, _reference(x, weight, branch, bias)) < 2e-3


@gpu
@pytest.mark.gpu
@EVERY_SOURCE
def test_repeated_launches_are_deterministic(source: launch.KernelSource) -> None:
    pk, _, _ = _gpu_layer(4096, 4096, rank=32, seed=9)
    x = torch.randn(16, 4096, device="cuda").half()
    first = launch.fused_linear(x, pk, None, source=source)
    for _ in range(20):
        assert torch.equal(launch.fused_linear(x, pk, None, source=source), first)
    x = torch.randn(100, 4096, device="cuda").half()
    for family in _row_block_families_here(source):
        first = ROW_BLOCK_LAUNCH[family](x, pk, None, source=source)
        for _ in range(20):
            assert torch.equal(ROW_BLOCK_LAUNCH[family](x, pk, None, source=source), first)


@gpu
@pytest.mark.gpu
@EVERY_SOURCE
def test_compressed_linear_uses_the_kernel_on_cuda(recwarn, source: launch.KernelSource, monkeypatch) -> None:
    monkeypatch.setenv(launch.KERNEL_ENV, source.name)
    fmt = FORMATS["int4-asym-g128"]
    gen = torch.Generator().manual_seed(5)
    q = quantize(torch.randn(256, 512, generator=gen) * 0.05, fmt)
    branch = LowRank(a=torch.randn(16, 512, generator=gen) * 0.05, b=torch.randn(256, 16, generator=gen) * 0.05)
    layer = CompressedLinear.from_quantized(q, fmt, None, branch=branch).cuda()
    x = torch.randn(2, 7, 512, device="cuda").half()
    y = layer(x)
    assert layer._kernel_cache and not [w for w in recwarn if "fused CUDA kernel" in str(w.message)]
    expected = layer.cpu()(x.float().cpu())
    assert _relative_error(y.cpu(), expected) < 2e-3

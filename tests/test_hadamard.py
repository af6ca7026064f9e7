"""Hadamard constructions and transforms: exact orthogonality, every width of the supported model
families, agreement of the factored transform with the dense Q, and refusals that name the fix."""

from __future__ import annotations

import math
import time

import pytest
import torch

from llmcompress.errors import ConfigError
from llmcompress.hadamard import HadamardTransform, hadamard_factor, hadamard_order_factors, has_hadamard

MODEL_SIZES = {
    "SmolLM2-135M": (576, 1536, 64), "SmolLM2-360M": (960, 2560), "SmolLM2-1.7B": (2048, 8192),
    "Llama-2-7B": (4096, 11008, 128), "Llama-3-8B": (4096, 14336), "Qwen2.5-0.5B": (896, 4864),
    "Qwen2.5-7B": (3584, 18944), "Qwen3": (1024, 3072, 2560, 9728, 4096, 12288),
    "Qwen3-30B-A3B experts": (2048, 768), "OLMoE": (2048, 1024), "Gemma-2-2B": (2304, 9216, 256),
    "Phi-3-mini": (3072, 8192, 96), "tiny test models": (8, 12, 16, 24, 32, 48, 96, 112, 160),
}
ALL_SIZES = sorted({n for sizes in MODEL_SIZES.values() for n in sizes})
# 100 is Paley II over GF(7^2), 344 Paley I over GF(7^3), 28 Paley I over GF(3^3).
ODD_LOOKING = [12, 24, 28, 96, 100, 344, 576, 1536]
TRANSFORMS = [(n, seed, block) for n in ODD_LOOKING for seed in (None, 7) for block in (None, 4)]


def _ids(params: tuple[int, int | None, int | None]) -> str:
    return "n{}-seed{}-block{}".format(*params)


@pytest.mark.parametrize("n", ALL_SIZES)
def test_every_model_size_has_a_decomposition(n):
    factors = hadamard_order_factors(n)
    assert math.prod(factors) == n and has_hadamard(n)


@pytest.mark.parametrize("m", sorted({m for n in ALL_SIZES + ODD_LOOKING + [1, 2] for m in hadamard_order_factors(n)}))
def test_every_factor_used_is_exactly_hadamard(m):
    h = hadamard_factor(m)
    assert h.dtype == torch.float64 and h.shape == (m, m)
    exact = h.to(torch.int64)
    assert torch.equal(exact.abs(), torch.ones_like(exact))
    assert torch.equal(exact @ exact.T, m * torch.eye(m, dtype=torch.int64))


def test_llama2_mlp_width_needs_a_prime_power_field():
    assert hadamard_order_factors(11008)[0] == 344  # 344 = 7^3 + 1; no order 43 * 2^j with a prime q exists


@pytest.mark.parametrize("params", TRANSFORMS, ids=_ids)
def test_q_is_orthogonal(params):
    n, seed, block = params
    q = HadamardTransform(n, seed=seed, block_size=block).matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("params", TRANSFORMS, ids=_ids)
def test_apply_is_x_times_q_and_transposed_inverts_it(params):
    n, seed, block = params
    transform = HadamardTransform(n, seed=seed, block_size=block)
    q = transform.matrix()
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(transform.apply(x), x @ q, atol=1e-10, rtol=0)
    torch.testing.assert_close(transform.apply_transposed(x), x @ q.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(transform.apply_transposed(transform.apply(x)), x, atol=1e-10, rtol=0)


def test_seeds_draw_signs_and_are_deterministic():
    x = torch.randn(4, 96)
    one, again, other = HadamardTransform(96, seed=1), HadamardTransform(96, seed=1), HadamardTransform(96, seed=2)
    assert torch.equal(one.apply(x), again.apply(x)) and torch.equal(one.apply(x), one.apply(x))
    assert not torch.equal(one.apply(x), other.apply(x))
    assert torch.equal(one.signs.abs(), torch.ones(96, dtype=torch.float64))


def test_low_precision_input_keeps_its_dtype():
    x = torch.randn(5, 576).to(torch.bfloat16)
    transform = HadamardTransform(576, seed=0)
    y = transform.apply(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), x.float() @ transform.matrix().float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("n", [11008, 18944])
def test_large_sizes_apply_without_a_dense_matrix(n):
    transform = HadamardTransform(n, seed=3)
    assert max(transform.factors) <= 344  # the largest dense matrix built is a factor, not n x n
    x = torch.randn(3, n, dtype=torch.float64)
    start = time.perf_counter()
    y = transform.apply(x)
    assert time.perf_counter() - start < 5
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-9, rtol=0)
    torch.testing.assert_close(transform.apply_transposed(y), x, atol=1e-10, rtol=0)
    # Row i of Q is signs[i] times the Kronecker product of the factors' rows, over sqrt(n).
    for i in (0, 1, n - 1):
        index, row = i, torch.ones(1, dtype=torch.float64)
        for m, stride in zip(transform.factors, _strides(transform.factors)):
            row = torch.kron(row, hadamard_factor(m)[index // stride])
            index %= stride
        one_hot = torch.zeros(n, dtype=torch.float64)
        one_hot[i] = 1
        torch.testing.assert_close(transform.apply(one_hot), transform.signs[i] * row / math.sqrt(n), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="apply"):
        transform.matrix()


def _strides(factors: tuple[int, ...]) -> list[int]:
    return [math.prod(factors[k + 1:]) for k in range(len(factors))]


@pytest.mark.parametrize("n", [9, 50, 668, 0])
def test_sizes_without_a_construction_are_refused(n):
    assert not has_hadamard(n)
    with pytest.raises(ConfigError, match="block_size" if n else "n >= 1"):
        HadamardTransform(n)


def test_block_size_rescues_a_size_without_a_full_hadamard():
    transform = HadamardTransform(668, seed=0, block_size=4)
    x = torch.randn(2, 668, dtype=torch.float64)
    torch.testing.assert_close(x @ transform.matrix(), transform.apply(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("block_size", [5, 0, 36 * 2, 9])
def test_a_bad_block_size_names_it_and_n(block_size):
    with pytest.raises(ConfigError, match=f"block_size {block_size} must divide n = 36"):
        HadamardTransform(36, block_size=block_size)


def test_wrong_width_and_non_factor_orders_are_refused():
    with pytest.raises(ConfigError, match="last dimension, 12"):
        HadamardTransform(24).apply(torch.zeros(2, 12))
    with pytest.raises(ConfigError, match="not a factor order"):
        hadamard_factor(172)

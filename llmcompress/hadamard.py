"""Hadamard transforms for QuaRot-style rotations, also for sizes that are not powers of two.

A rotation by a (randomised) Hadamard matrix spreads activation outliers over all channels,
which is what makes 4-bit activations usable. LLM widths are rarely powers of two (Llama-2's
11008 = 2^8 * 43, Qwen2.5's 18944 = 2^9 * 37), so an order-n Hadamard is built as the Kronecker
product of Sylvester matrices (powers of two) and one or two Paley matrices (q+1 for a prime
power q = 3 mod 4, 2(q+1) for q = 1 mod 4). The transform contracts the last dimension with
one small factor at a time and never builds the n x n matrix (18944^2 float64 is 2.8 GB).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

# A dense factor costs its order in multiply-adds per element, and each factor is one more
# pass over x in memory, worth about a 64-wide contraction (float32 timings on CPU: 4096 as
# 16*16*16 beats 64*64, 14336 as 28*32*16 beats 224*64, 11008 as 344*32 beats 344*4*8).
PASS_COST = 64
# Sylvester factors stay small enough for dense matmuls to beat the extra pass.
MAX_SYLVESTER = 256
# Larger Paley cores would be slower than a block-diagonal rotation and take over 100 MB dense.
MAX_PALEY = 4096
# Beyond this a dense Q is too big to be worth building, even for tests.
MAX_DENSE = 4096


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 1
    while p**k < q:
        k += 1
    return (p, k) if p**k == q else None


def _paley_kind(m: int) -> tuple[int, int] | None:
    """(1, q) where m = q + 1 is a Paley I order, (2, q) where m = 2(q + 1) is a Paley II
    order, else None. Powers of two are left to Sylvester, which needs no field arithmetic."""
    if _is_power_of_two(m) or m > MAX_PALEY:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return (1, m - 1)
    if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return (2, m // 2 - 1)
    return None


def _irreducible(p: int, k: int) -> np.ndarray:
    """c_0..c_{k-1} of the first monic x^k + ... + c_0 over GF(p) that no product of two
    lower-degree monic polynomials equals; brute force is cheap as q = p^k is a few thousand."""
    def monic(degree: int) -> list[tuple[int, ...]]:
        return [coeffs + (1,) for coeffs in itertools.product(range(p), repeat=degree)]
    reducible = {tuple(int(c) for c in np.convolve(g, h) % p)
                 for d in range(1, k // 2 + 1) for g in monic(d) for h in monic(k - d)}
    return np.array(next(f for f in monic(k) if f not in reducible)[:k])


def _quadratic_character(p: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The base-p digits [q, k] of every element of GF(p^k) (digit t: the coefficient of x^t),
    and chi over that numbering: 1 on nonzero squares, -1 on non-squares, 0 on 0."""
    q = p**k
    digits = np.arange(q)[:, None] // p ** np.arange(k) % p
    square = np.zeros((q, 2 * k - 1), dtype=np.int64)
    for i, j in itertools.product(range(k), repeat=2):
        square[:, i + j] += digits[:, i] * digits[:, j]
    modulus = _irreducible(p, k)
    for degree in range(2 * k - 2, k - 1, -1):  # x^k = -(c_0 + ... + c_{k-1} x^{k-1})
        square[:, degree - k:degree] -= square[:, degree:degree + 1] * modulus
    chi = np.full(q, -1, dtype=np.int64)
    chi[square[:, :k] % p @ p ** np.arange(k)] = 1
    chi[0] = 0
    return digits, chi


def _paley(kind: int, q: int) -> Tensor:
    p, k = _prime_power(q)
    digits, chi = _quadratic_character(p, k)
    difference = sum((digits[:, None, t] - digits[None, :, t]) % p * p**t for t in range(k))
    jacobsthal = torch.from_numpy(chi[difference]).double()  # chi(a_i - a_j)
    ones = torch.ones(1, q, dtype=torch.float64)
    if kind == 1:  # chi(-1) = -1: the core is skew and I + S is Hadamard
        skew = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1),
                          torch.cat([-ones.T, jacobsthal], 1)])
        return torch.eye(q + 1, dtype=torch.float64) + skew
    conference = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1),
                            torch.cat([ones.T, jacobsthal], 1)])
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero_block)


@functools.cache
def hadamard_factor(m: int) -> Tensor:
    """The dense float64 +-1 Hadamard matrix of one factor order (Sylvester or Paley). Cached
    and shared between callers: do not modify it in place."""
    if _is_power_of_two(m):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < m:
            h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
        return h
    kind = _paley_kind(m)
    if kind is None:
        raise ConfigError(f"{m} is not a factor order (a power of two, or a Paley order up to {MAX_PALEY}): "
                          f"take the factors of hadamard_order_factors(n)")
    return _paley(*kind)


def _cost(factors: tuple[int, ...]) -> int:
    return sum(factors) + PASS_COST * len(factors)


def _split_power_of_two(size: int) -> tuple[int, ...]:
    """The cheapest split of 2^k into Sylvester factors of at most MAX_SYLVESTER, near-equal."""
    k = size.bit_length() - 1
    if k == 0:
        return ()
    smallest = -(-k // int(math.log2(MAX_SYLVESTER)))
    splits = [tuple(2 ** (k // count + (i < k % count)) for i in range(count)) for count in range(smallest, k + 1)]
    return min(splits, key=_cost)


@functools.cache
def hadamard_order_factors(n: int) -> tuple[int, ...]:
    """Orders whose Kronecker product is a Hadamard matrix of order n: one Paley core (or two
    Paley orders) times Sylvester factors, the cheapest to apply by ``_cost``."""
    if n < 1:
        raise ConfigError(f"a Hadamard transform needs a size n >= 1, got {n}")
    two = n & -n
    if two == n:
        return _split_power_of_two(n) or (1,)
    options = []
    for j in range(two.bit_length()):
        core = n // two << j
        rest = _split_power_of_two(n // core)
        if _paley_kind(core):
            options.append((core,) + rest)
        options += [(a, core // a) + rest for a in range(3, math.isqrt(core) + 1)
                    if core % a == 0 and _paley_kind(a) and _paley_kind(core // a)]
    if not options:
        fix = (f"pass a block_size that divides {n} and is a power of two, e.g. {min(two, 64)}" if two > 1 else
               "an odd size has no block_size above 1 either: pad it to a multiple of 4 or leave it unrotated")
        raise ConfigError(f"no Hadamard matrix of order {n} is known to this library (it builds powers of two "
                          f"times Paley orders q+1 and 2(q+1), all multiples of 4 above 2): {fix}")
    return min(options, key=_cost)


def has_hadamard(n: int) -> bool:
    """Whether a full order-n rotation exists here, so callers can fall back to a block_size."""
    try:
        hadamard_order_factors(n)
    except ConfigError:
        return False
    return True


@functools.cache
def _factor_on(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The factor where and as the computation needs it, so a hot loop copies it once."""
    return hadamard_factor(m).to(device=device, dtype=dtype)


class HadamardTransform:
    """Q = diag(signs) H / sqrt(b), H = n/b diagonal blocks of one order-b Hadamard (b = n
    without ``block_size``). ``seed`` draws the +-1 signs of QuaRot's randomised Hadamard;
    None leaves them out. Q is orthogonal, so ``apply_transposed`` undoes ``apply``."""

    def __init__(self, n: int, seed: int | None = None, block_size: int | None = None) -> None:
        if n < 1:
            raise ConfigError(f"a Hadamard transform needs a size n >= 1, got {n}")
        if block_size is not None and (block_size < 1 or n % block_size or not has_hadamard(block_size)):
            raise ConfigError(f"block_size {block_size} must divide n = {n} and have a Hadamard matrix: "
                              f"pass a power of two dividing {n}, e.g. {min(n & -n, 64)}")
        self.n, self.seed, self.block_size = n, seed, block_size
        self.block = block_size or n
        self.factors = hadamard_order_factors(self.block)
        self.signs: Tensor | None = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            self.signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        # Signs and normalisation in one vector: one elementwise pass instead of two.
        self._scale = (torch.ones(n, dtype=torch.float64) if self.signs is None else self.signs) / math.sqrt(self.block)

    def apply(self, x: Tensor) -> Tensor:
        """x @ Q over the last dimension, computed in float32 (float64 for float64 x)."""
        return self._rotate(x, transposed=False)

    def apply_transposed(self, x: Tensor) -> Tensor:
        """x @ Q^T, the inverse of ``apply``."""
        return self._rotate(x, transposed=True)

    def _rotate(self, x: Tensor, transposed: bool) -> Tensor:
        if x.shape[-1] != self.n:
            raise ConfigError(f"a HadamardTransform of size {self.n} got a tensor of shape {tuple(x.shape)}: "
                              f"build one for its last dimension, {x.shape[-1]}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = self._scale.to(device=x.device, dtype=dtype)
        y = x.to(dtype) if transposed else x.to(dtype) * scale
        rows = y.reshape(-1, self.block)
        # x @ (A kron B) contracts the leading factor axis with A and moves it last; after every
        # factor has had its turn the axes are back in order.
        for m in self.factors:
            h = _factor_on(m, dtype, x.device)
            rows = (rows.reshape(rows.shape[0], m, self.block // m).transpose(1, 2) @ (h.T if transposed else h))
            rows = rows.reshape(-1, self.block)
        y = rows.reshape(x.shape)
        return (y * scale if transposed else y).to(x.dtype)

    def matrix(self) -> Tensor:
        """The dense float64 Q, built independently of ``apply``, to check it (n <= MAX_DENSE)."""
        if self.n > MAX_DENSE:
            raise ConfigError(f"a dense Q of order {self.n} is too big to build (limit {MAX_DENSE}): "
                              f"use apply / apply_transposed, which never build it")
        block = functools.reduce(torch.kron, [hadamard_factor(m) for m in self.factors])
        h = torch.kron(torch.eye(self.n // self.block, dtype=torch.float64), block)
        return self._scale[:, None] * h

"""Keeping the host memory of a long block-by-block run flat.

glibc serves a large allocation with its own memory map and gives it back on free, but it
raises that size threshold to the largest block freed so far (up to 32 MB). After the first
block, a block's weights, Hessians and GPTQ buffers are all carved from the heap instead,
whose fragments are not given back: resident memory then creeps up block after block. Pinning
the threshold keeps every buffer above it mapped and returned, so memory tracks one block.

Pinned, though, every large temporary of the calibration forwards is mapped and zero-filled
afresh, which made GPTQ on SmolLM2 35% slower (104 s against 77 s). The forwards allocate and
free the same few shapes over and over, so during them the threshold is raised to glibc's
maximum and the heap's free pages are handed back (``malloc_trim``) when they end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
FORWARD_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit

_pinned = False


@functools.cache
def _glibc():  # noqa: ANN202 - the C library, or None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.mallopt, library.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return None
    return library


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; returns False where the C library is not glibc."""
    global _pinned
    glibc = _glibc()
    _pinned = glibc is not None and bool(glibc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _pinned


@contextmanager
def forward_allocations() -> Iterator[None]:
    """Around calibration forwards: allocate from the heap, then give its free pages back."""
    if not _pinned:
        yield
        return
    glibc = _glibc()
    glibc.mallopt(M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        glibc.malloc_trim(0)
        glibc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)

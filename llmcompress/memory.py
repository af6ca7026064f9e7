"""Keeping the host memory of a long block-by-block run flat.

glibc serves a large allocation with its own memory map and gives it back on free, but it
raises that size threshold to the largest block freed so far (up to 32 MB). After the first
block, a block's weights, Hessians and GPTQ buffers are all carved from the heap instead,
whose fragments are not given back: resident memory then creeps up block after block. Pinning
the threshold keeps every buffer above it mapped and returned, so memory tracks one block.

It costs time: every large temporary is mapped and zero-filled afresh. GPTQ W4 g128 on SmolLM2
(32 x 512 calibration tokens, 2-core CPU) took 104 s pinned and 77 s unpinned. Calling
``malloc_trim`` after each block instead ran in 74 s but let the synthetic 1.43B Llama of
eval/streaming_memory.py peak at 2527 MB against 1541 MB pinned: the fragments that matter
pile up inside a block, so the pin stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))

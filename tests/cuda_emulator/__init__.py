"""Run the kernel sources of kernels/ (launch.SOURCES) on the CPU, through the emulator in
emulator.h (its header says what it emulates and what it checks). Each variant of each source is
built once with g++ and cached on disk, keyed by the kernel text, the emulator and the defines."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from llmcompress.cuda import launch

HERE = Path(__file__).resolve().parent
EARLY, REVERSE = 1, 2


@dataclass(frozen=True)
class Schedule:
    """How the emulator runs a launch (emulator.h): ``flags`` (EARLY: cp.async copies land at
    issue, not at their wait; REVERSE: threads run in reverse order), how many blocks are
    resident at once, and the seed that shuffles their turns (0: in slot order)."""

    flags: int = 0
    resident: int = 1
    seed: int = 0


# One block at a time with copies landing late; the opposite on both counts; and 8 blocks running
# together, their atomics and spin waits interleaved in a shuffled order. With 8 (not 4) resident,
# main items meet branch items still running often enough that a kernel whose main items skip
# their wait for t failed 3 of the 4 split and branch-item tests, not 1.
SCHEDULES = {"late": Schedule(), "early-reversed": Schedule(EARLY | REVERSE), "concurrent": Schedule(resident=8, seed=1)}
SHARED_DECLARATION = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")
SHARED_VARIABLE = re.compile(r"__shared__ (\w+) (\w+);")
KERNEL_FAMILY = re.compile(r"W4_\w+\((w4_\w+?_)##SUFFIX(?:##(\w+))?\s*,")


class EmulatorError(RuntimeError):
    """The kernel did something the emulator reports (see emulator.h), or would not build."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def translate(source: str, variant: str) -> str:
    """The kernel source as g++ builds it: its dynamic shared memory and ``__shared__`` variables
    taken from the emulator's running block, and each kernel of its W4_VARIANT list registered
    under the name the loader asks for."""
    translated, count = SHARED_DECLARATION.subn(r"unsigned char* \1 = ::emu::dynamic_shared();", source)
    if count != source.count("extern __shared__"):
        raise EmulatorError("the kernel declares dynamic shared memory in a form the emulator does not rewrite")
    declarations = itertools.count()
    translated = SHARED_VARIABLE.sub(
        lambda match: f"{match[1]}& {match[2]} = ::emu::block_static<{match[1]}>({next(declarations)});", translated)
    if "__shared__" in translated:
        raise EmulatorError("the kernel declares a __shared__ variable in a form the emulator does not rewrite (`__shared__ T name;`)")
    families = KERNEL_FAMILY.findall(source)
    if not families:
        raise EmulatorError("found no W4_VARIANT kernel list in the kernel source")
    return translated + "\n" + "".join(f"EMU_KERNEL({prefix}{variant}{suffix})\n" for prefix, suffix in families)


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMCOMPRESS_EMULATOR_CACHE", Path(tempfile.gettempdir()) / "llmcompress-cuda-emulator"))


@functools.cache
def library(source: launch.KernelSource, variant: str) -> ctypes.CDLL:
    """The emulated build of one variant of a kernel source (compiled on first use: about 6 s on 2 cores)."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler (g++) to build the CUDA emulator")
    code = translate(launch.kernel_text(source), variant)
    options = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-w", f"-I{HERE / 'include'}",
               *launch.compile_defines(variant, source)]
    key = hashlib.sha256("\0".join([code, (HERE / "emulator.h").read_text(), *options]).encode()).hexdigest()[:16]
    stem = Path(source.filename).stem
    built = _cache_dir() / f"{stem}_{variant}_{key}.so"
    if not built.exists():
        built.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=built.parent) as work:
            translated, output = Path(work) / f"{stem}.cpp", Path(work) / f"{stem}.so"
            translated.write_text(code)
            result = subprocess.run([cxx, *options, "-o", str(output), str(translated)], capture_output=True, text=True)
            if result.returncode:
                raise EmulatorError(f"{cxx} could not build {source.filename} ({variant}) for the emulator:\n"
                                    f"{result.stderr[-4000:]}")
            os.replace(output, built)  # whole or not at all, for a concurrent or later run
    emulated = ctypes.CDLL(str(built))
    emulated.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                    ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64),
                                    ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    emulated.emu_launch.restype = ctypes.c_int
    return emulated


def _encode(argument: object) -> tuple[int, int, int]:
    """(kind, value, bytes) of one kernel argument: a CPU tensor or None (a pointer), or a
    numpy int32 or float32 (a scalar), as CuPy would be given them."""
    if argument is None:
        return 0, 0, 0
    if isinstance(argument, torch.Tensor):
        if argument.device.type != "cpu" or not argument.is_contiguous():
            raise EmulatorError("the emulator takes contiguous CPU tensors")
        return 0, argument.data_ptr(), argument.numel() * argument.element_size()
    if isinstance(argument, (numpy.int32, numpy.float32)):
        return 1, int(numpy.array(argument).view(numpy.uint32)), 0
    raise EmulatorError(f"a kernel argument of type {type(argument).__name__}")


def run(source: launch.KernelSource, variant: str, kernel: str, blocks: int, threads: int, shared: int,
        arguments: Sequence[object], schedule: str | Schedule = "late") -> None:
    """Launch ``kernel`` of ``source``'s ``variant`` as CuPy would: ``blocks`` x ``threads``, ``shared``
    bytes of dynamic shared memory, run as ``schedule`` (a Schedule or a name in SCHEDULES).
    Tensors are read and written in place."""
    encoded = [_encode(argument) for argument in arguments]
    count = len(encoded)
    kinds = (ctypes.c_int * count)(*(kind for kind, _, _ in encoded))
    values = (ctypes.c_uint64 * count)(*(value for _, value, _ in encoded))
    sizes = (ctypes.c_uint64 * count)(*(size for _, _, size in encoded))
    error = ctypes.create_string_buffer(4096)
    how = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
    if library(source, variant).emu_launch(kernel.encode(), blocks, threads, shared, how.resident, how.seed, count, kinds, values, sizes,
                                   how.flags, error, len(error)):
        raise EmulatorError(f"{kernel}: {error.value.decode()}")

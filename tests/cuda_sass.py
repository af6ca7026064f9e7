"""A check of what ptxas built, which no source-level test can see: between a warpgroup MMA
(HGMMA) and the WARPGROUP.DEPBAR that waits for it, no other instruction may write the registers
it reads as A or accumulates into. PTX makes that undefined (see wgmma.wait_group), and the
compiler does not prevent it. The wgmma kernel (kernels/w4_linear_tiled.cu) once named its two
fragment buffers through one array indexed by the k-block's parity: ptxas gave both the same
registers, and each k-block's decode overwrote the A of the wgmmas still in flight
(docs/decisions/0007). The CUDA emulator runs the C++, where the two buffers are distinct, so
only the SASS shows this.

    python tests/cuda_sass.py [--require-hgmma] BUILD.cubin ...   (needs nvdisasm: pip install nvidia-cuda-nvdisasm)

Exits 1, naming the writes, if any cubin has one, or with --require-hgmma, if one has no
warpgroup MMA at all (a wgmma source built for plain sm_90, where its wrappers trap, would
otherwise pass unchecked). .ci/run runs it on every variant it builds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

FUNCTION = re.compile(r"^\.text\.(\w+):$")
LABEL = re.compile(r"^(\.L_x_\d+):")
INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;")
PREDICATE = r"!?U?P(?:\d+|T)"
GUARD = re.compile(rf"^@{PREDICATE}\s+")
BRANCH = re.compile(r"^BRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)")
# The shape, the accumulators' first register and A (a register, or gdesc[...] for shared memory),
# for every input type: HGMMA.64x64x16.F32 (FP16) and HGMMA.64x64x16.F32.BF16 alike.
HGMMA = re.compile(r"^HGMMA\.64x(\d+)x\d+\.F32(?:\.\w+)*\s+R(\d+),\s*(\w+)")
WAIT_ALL = re.compile(r"^WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b")
REGISTER = re.compile(r"R(\d+)")
# Opcodes that write no general register (stores, control, synchronisation) or only predicates.
NO_REGISTER_WRITE = ("ST", "STS", "STG", "STL", "RED", "BAR", "BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "NOP",
                     "WARPSYNC", "WARPGROUP", "HGMMA", "DEPBAR", "LDGDEPBAR", "LDGSTS", "MEMBAR", "FENCE", "ISETP",
                     "FSETP", "HSETP2", "DSETP", "PLOP3", "ERRBAR", "CCTL", "YIELD", "ARRIVES", "SYNCS")


@dataclass(frozen=True)
class Overwrite:
    hgmma: str
    writer: str


def _width(opcode: str) -> int:
    """How many consecutive registers an instruction's destination spans."""
    if ".128" in opcode or re.search(r"\.4$", opcode):
        return 4
    if ".64" in opcode or ".WIDE" in opcode or opcode.startswith("CS2R") or re.search(r"\.2$", opcode):
        return 2
    return 1


def written_registers(instruction: str) -> set[int]:
    """The general registers an instruction writes: its first register operand, after any
    predicate outputs, for every opcode that writes one."""
    opcode, _, operands = GUARD.sub("", instruction).partition(" ")
    if opcode.split(".")[0] in NO_REGISTER_WRITE:
        return set()
    for operand in (o.strip() for o in operands.split(",")):
        if re.fullmatch(PREDICATE, operand):
            continue
        match = REGISTER.fullmatch(operand)
        return set(range(int(match.group(1)), int(match.group(1)) + _width(opcode))) if match else set()
    return set()


def functions(sass: str) -> dict[str, tuple[list[str], dict[str, int]]]:
    """Each function's instructions, in order, and its labels' instruction indices."""
    found: dict[str, tuple[list[str], dict[str, int]]] = {}
    instructions: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        stripped = line.strip()
        if match := FUNCTION.match(stripped):
            instructions, labels = [], {}
            found[match.group(1)] = (instructions, labels)
        elif match := LABEL.match(stripped):
            labels[match.group(1)] = len(instructions)
        elif match := INSTRUCTION.search(line):
            instructions.append(match.group(1))
    return found


def _successors(instructions: list[str], labels: dict[str, int], index: int) -> list[int]:
    instruction = instructions[index]
    guarded = GUARD.match(instruction) is not None
    bare = GUARD.sub("", instruction)
    following = [index + 1] if index + 1 < len(instructions) else []
    if match := BRANCH.match(bare):
        return [labels[match.group(1)], *(following if guarded else [])]
    if bare.startswith(("EXIT", "RET")) and not guarded:
        return []
    return following


def overwrites(instructions: list[str], labels: dict[str, int]) -> list[Overwrite]:
    """Every instruction reachable from an HGMMA, before a wait for all groups, that writes its A
    registers (4) or its accumulators (N/2 for a 64xN F32 tile)."""
    found = []
    for index, instruction in enumerate(instructions):
        match = HGMMA.match(GUARD.sub("", instruction))
        if not match:
            continue
        accumulator = int(match.group(2))
        busy = set(range(accumulator, accumulator + int(match.group(1)) // 2))
        if a := REGISTER.fullmatch(match.group(3)):
            busy |= set(range(int(a.group(1)), int(a.group(1)) + 4))
        seen: set[int] = set()
        pending = _successors(instructions, labels, index)
        while pending:
            at = pending.pop()
            if at in seen:
                continue
            seen.add(at)
            if WAIT_ALL.match(GUARD.sub("", instructions[at])):
                continue
            if written_registers(instructions[at]) & busy:
                found.append(Overwrite(instruction, instructions[at]))
            pending.extend(_successors(instructions, labels, at))
    return found


def _is_hgmma(instruction: str) -> bool:
    return GUARD.sub("", instruction).startswith("HGMMA")


def nvdisasm() -> str | None:
    """nvdisasm from the CUDA toolkit, or from the nvidia-cuda-nvdisasm wheel."""
    if found := shutil.which("nvdisasm"):
        return found
    for wheel in sorted(Path(sysconfig.get_paths()["purelib"], "nvidia").glob("cu*/bin/nvdisasm")):
        if os.access(wheel, os.X_OK):
            return str(wheel)
    return None


def problems(cubin: str, sass: str, require_hgmma: bool = False) -> int:
    """Check one cubin's SASS, printing what it finds: how many problems it has."""
    found_problems = 0
    with_hgmma = {name: body for name, body in functions(sass).items() if any(_is_hgmma(i) for i in body[0])}
    if not with_hgmma:
        print(f"cuda_sass: {cubin}: no warpgroup MMA" + (", but --require-hgmma" if require_hgmma else ""))
        found_problems += int(require_hgmma)
    for name, (instructions, labels) in with_hgmma.items():
        hgmmas = [i for i in instructions if _is_hgmma(i)]
        unread = [i for i in hgmmas if not HGMMA.match(GUARD.sub("", i))]
        if unread:  # a form this check cannot read would otherwise go unchecked
            print(f"cuda_sass: {name}: cannot read {unread[0]!r} ({len(unread)} such)")
            found_problems += len(unread)
            continue
        found = overwrites(instructions, labels)
        print(f"cuda_sass: {name}: {len(hgmmas)} HGMMA, {len(found)} writes of registers they still use")
        for overwrite in found[:5]:
            print(f"    {overwrite.hgmma}  <-  {overwrite.writer}")
        found_problems += len(found)
    return found_problems


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cubins", nargs="+")
    parser.add_argument("--require-hgmma", action="store_true", help="a cubin without a warpgroup MMA is a problem")
    args = parser.parse_args(arguments)
    tool = nvdisasm()
    if tool is None:
        print("cuda_sass: no nvdisasm (pip install nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 2
    total = 0
    for cubin in args.cubins:
        sass = subprocess.run([tool, "-c", cubin], check=True, capture_output=True, text=True).stdout
        total += problems(cubin, sass, args.require_hgmma)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

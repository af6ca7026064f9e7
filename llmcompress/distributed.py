"""Calibration across processes with ``torch.distributed``: launched by ``torchrun``, each
process runs the blocks on a share of the calibration micro-batches, the statistics are reduced
in micro-batch order, and the layers' compression is split between the processes.

The checkpoint is the bits a single process writes: micro-batch ``i`` goes to process
``i % world``; every statistic is summed one micro-batch's contribution at a time in micro-batch
order on every process (``LayerStats.add``), as one process sums them; what a single process
decides on the first micro-batch (the block's input groups, where scales fold) is decided by the
process holding it; and a process that compresses a group of layers runs exactly what a single
process runs on that group. Floating point is the same only at the same thread count:
``torchrun`` gives each process one thread (OMP_NUM_THREADS=1), so compare with a single process
run the same way.

Only process 0 writes (the checkpoint, the report) and evaluates; the others lend it their share
of the work and exit. Nothing here runs unless a process group of more than one process is
initialised (``process_group``), so a single process never waits on a collective.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError

T = TypeVar("T")
# Process 0 evaluates the float model before the compression starts, while the others wait in
# their first collective: gloo's and NCCL's default 30 minutes is shorter than a large model's evaluation.
TIMEOUT = timedelta(hours=12)
# What the layer passes change on a ``LayerState``; the rest (target, weights, H) every process has.
_SHARED_FIELDS = ("target", "original", "hessian")


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes, evaluates and prints: the only one, or rank 0."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join the process group ``torchrun`` describes (gloo for the CPU, NCCL for GPUs) for the
    duration, and yield the device this process computes on (``cuda`` becomes ``cuda:LOCAL_RANK``).
    Without a launcher, or inside a group someone else started, nothing happens."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if device == "auto":
        raise ConfigError("--device auto spreads one process's blocks over every GPU, which clashes with one process per GPU "
                          "under torchrun: use --device cuda (each process takes GPU LOCAL_RANK) or --device cpu")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process LOCAL_RANK={local} has no GPU of its own ({torch.cuda.device_count()} visible): "
                              "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def my_share(batches: Sequence[T]) -> list[T]:
    """This process's micro-batches: every ``world``-th, from its rank on."""
    if not active():
        return list(batches)
    if len(batches) < world():
        raise ConfigError(f"{len(batches)} calibration micro-batches cannot be shared by {world()} processes: "
                          "raise --nsamples, lower --batch-size, or start fewer processes")
    return list(batches[rank()::world()])


def rounds(local_count: int) -> int:
    """How many micro-batches the busiest process has: every process takes part in that many reductions."""
    if not active():
        return local_count
    count = torch.tensor([local_count], device=_comm_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def exchange(parts: T, device: torch.device) -> list[T]:
    """Every process's ``parts`` (anything ``torch.save`` writes), in rank order, tensors on ``device``:
    one round of micro-batches, rank ``r`` holding micro-batch ``round * world + r``."""
    return [broadcast(parts if source == rank() else None, source, device) for source in range(world())]


def from_first(compute: Callable[[], T], device: torch.device | str = "cpu") -> T:
    """``compute()`` as process 0 finds it, on every process: what a single process decides on the
    first micro-batch, which process 0 holds."""
    if not active():
        return compute()
    return broadcast(compute() if is_main() else None, 0, device)


def broadcast(value: Any, source: int, device: torch.device | str) -> Any:
    """``value`` from process ``source``, exact to the bit (serialised by ``torch.save``), its tensors on ``device``."""
    comm = _comm_device()
    if rank() == source:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(comm)
        size = torch.tensor([data.numel()], device=comm)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=comm)
    dist.broadcast(size, source)
    if rank() != source:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=comm)
    dist.broadcast(data, source)
    if rank() == source:
        return value
    # Our own bytes, from a process of this run: the states hold dataclasses and tuples.
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=device, weights_only=False)


def split_layer_work(states: list, passes: Sequence, run: Callable[[list, Sequence], None]) -> None:
    """``run(states, passes)`` with the states shared out among the processes: each runs the
    groups of layers that share one H (the unit a column loop stacks and EoRA decomposes once) that
    fall to it, then every process receives the others' results. When a pass looks across the
    stage's layers (a rank budget spread by energy), every process runs them all."""
    units = _units(states)
    if not active() or len(units) < 2 or not all(p.layers_independent([s.target.config(p.index) for s in states]) for p in passes):
        run(states, passes)
        return
    for index, unit in enumerate(units):
        if index % world() == rank():
            run(unit, passes)
    for index, unit in enumerate(units):
        device = unit[0].weight.device
        results = broadcast([{f.name: getattr(s, f.name) for f in fields(s) if f.name not in _SHARED_FIELDS} for s in unit],
                            index % world(), device)
        for state, result in zip(unit, results, strict=True):
            for name, value in result.items():
                setattr(state, name, value)


def _units(states: list) -> list[list]:
    """Consecutive states sharing one H object; a state without H is a unit of its own."""
    units: list[list] = []
    for state in states:
        if units and state.hessian is not None and state.hessian is units[-1][-1].hessian:
            units[-1].append(state)
        else:
            units.append([state])
    return units


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

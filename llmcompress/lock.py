"""One run at a time per output directory: ``OUT.lock`` beside it, held with ``flock`` from the
checks before a run until its result is in place.

The kernel drops a ``flock`` when its process ends, however it ends, so a killed run never blocks
the next one; the pid in the file only names the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

LOCK_SUFFIX = ".lock"

# The locks this process holds: the CLI takes one for the whole run, and the API functions it calls take the same one again.
_held: set[str] = set()


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + LOCK_SUFFIX)


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output directory ``out``, or refuse at once when another run holds it."""
    path = lock_path(Path(out).expanduser())
    key = os.path.realpath(path)
    if key in _held:
        yield
        return
    descriptor = _acquire(path, Path(out))
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        # Removed while still held: a run that opened the file meanwhile finds it gone once it gets the lock, and tries again.
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _acquire(path: Path, out: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise CheckpointError(f"{out} is being written by another run (process {holder}, which holds {path}): "
                                      "wait for it to finish, or choose another --out") from None
            if _still_named(descriptor, path):
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
                return descriptor
            os.close(descriptor)
    except OSError as err:
        raise CheckpointError(f"cannot create the lock file {path} ({err.strerror or err}): choose an --out in a directory you can write to") from err


def _still_named(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor`` (the run that held it may have removed it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

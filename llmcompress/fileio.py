"""Atomic directory writes: build in a hidden staging directory, then rename into place."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INCOMPLETE_SUFFIX = ".incomplete"


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    On any failure (an exception, a full disk) the staging directory is removed and ``target``
    is left as it was, so a half-written directory never appears under the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{INCOMPLETE_SUFFIX}-", dir=target.parent))
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, its files given the modes the umask asks for; an existing
    ``target`` is renamed aside first and removed once ``source`` is in its place. A rename that
    fails leaves ``target`` as it was and nothing beside it."""
    follow_umask(source)
    if not target.exists():
        os.replace(source, target)
        return
    # A sibling, not a directory made to hold it: a failed rename then leaves no empty directory behind.
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    os.replace(target, retired)
    try:
        os.replace(source, target)
    except OSError:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it is read by setting it and
    setting it back, which for that instant gives files that other threads create the wrong mode."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give ``root`` (a file, or a directory and everything in it) the mode an ordinary open or
    mkdir would: safetensors writes through a private temporary file (0600) and mkdtemp makes
    0700 directories, which would keep a published result from the other users the umask lets in."""
    mask = umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def incomplete_name(name: str) -> str:
    """The name ``staged_file`` writes ``name`` under until it is complete."""
    return f".{name}{INCOMPLETE_SUFFIX}"


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename."""
    temporary = target.with_name(incomplete_name(target.name))
    try:
        yield temporary
        follow_umask(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)

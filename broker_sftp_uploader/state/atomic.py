"""Crash-safe file writes: a temp file beside the target, fsync, rename, fsync the folder.

A reader of the target sees either the old content or the complete new one, never a half-written
file, and a failure (exception, Ctrl-C) removes the temp file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_directory(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where the OS cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_temp_file(folder: Path, prefix: str, suffix: str = ".tmp") -> Iterator[tuple[BinaryIO, Path]]:
    """Yield a new 0600 binary temp file in ``folder`` and its path; remove it on the way out.

    The caller may rename the file away before leaving; removal then finds nothing to do.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield handle, path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def leftover_temp_files(target: Path) -> list[Path]:
    """Temp files of ``atomic_write(target)`` that a killed process left beside ``target``."""
    target = Path(target)
    return sorted(target.parent.glob(f"{_temp_prefix(target)}*.tmp"))


@contextlib.contextmanager
def atomic_write(target: Path, mode: int = 0o600, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``target`` atomically when the block ends cleanly.

    :param target: the final path; its folder must exist.
    :param mode: permission bits of the new file (0600 by default: ledgers and plaintext are private).
    :param overwrite: when False, raise ``FileExistsError`` if ``target`` exists at commit time.
    :raises OSError: when the temp file cannot be written or renamed; the target is then unchanged.
    """
    target = Path(target)
    folder = target.parent
    with private_temp_file(folder, prefix=_temp_prefix(target), suffix=".tmp") as (handle, temp_path):
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        os.chmod(temp_path, mode)
        if overwrite:
            os.replace(temp_path, target)
        else:
            # link() fails if the target exists, so a concurrent writer can never be clobbered.
            os.link(temp_path, target)
            temp_path.unlink()
    fsync_directory(folder)

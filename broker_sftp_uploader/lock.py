"""A run lock in the working folder, so two runs never work on the same ledger at once.

``flock`` on an open file: the kernel releases it when the process ends, however it ends, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from broker_sftp_uploader.errors import LedgerError, LockedError

LOCK_FILE_NAME = "status.xml.lock"


class RunLock:
    """Exclusive, non-blocking lock on ``folder/status.xml.lock``; use as a context manager."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or fail at once.

        :raises LockedError: another process holds it (its pid is named when known).
        :raises LedgerError: the lock file cannot be created in the working folder.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise LedgerError(f"cannot open lock file {self.path}: {error.strerror}; "
                              "check the permissions of MISC.WORKING_DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise LockedError(f"another run holds the lock {self.path}{who}; "
                              "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; it is reused by the next run)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

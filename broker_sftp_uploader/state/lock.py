"""A run lock in the working folder, so two runs never work on the same ledger at once.

``flock`` on an open file: the kernel releases it when the process ends, however it ends, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from pathlib import Path

from broker_sftp_uploader.config import LEDGER_FILE_NAME
from broker_sftp_uploader.errors import LedgerError, LockedError

LOCK_FILE_NAME = LEDGER_FILE_NAME + ".lock"
_PID_TEXT = re.compile(rb"[0-9]{0,10}\n?")


def live_holder(fd: int) -> str | None:
    """The pid written in the lock file, if that process is alive (a holder writes its pid only
    after taking the lock, so for a moment the file may still name the previous run)."""
    for _ in range(2):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            try:
                os.kill(int(text), 0)
                return text
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, under another user
                return text
        time.sleep(0.05)
    return None


def _open_lock(path: Path, flags: int) -> int:
    """Open the lock file with ``flags``, never through a symbolic link.

    :raises FileNotFoundError: it does not exist (and ``flags`` does not create it).
    :raises LedgerError: it is a symbolic link or cannot be opened.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LedgerError(f"lock file {path} is a symbolic link; remove it (a run creates a plain file "
                              "there)") from None
        raise LedgerError(f"cannot open lock file {path}: {error.strerror}; check the permissions of "
                          "MISC.WORKING_DIR") from None


def lock_holder(folder: Path) -> tuple[bool, str | None]:
    """Whether a run holds the lock in ``folder`` now, and its pid if known; creates and takes nothing.

    Tested with a shared lock that is dropped at once. (A run starting in that very instant would find
    the lock held and exit 11; the next one runs.)

    :raises LedgerError: the lock path is a symbolic link or cannot be opened.
    """
    try:
        fd = _open_lock(Path(folder) / LOCK_FILE_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True, live_holder(fd)  # the pid, unless the file still names a run that ended
    finally:
        os.close(fd)  # also drops the shared lock
    return False, None


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
        # O_NOFOLLOW: a symlink planted at the lock's path must not make us write through it.
        fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT)
        try:
            self._check_ours(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = live_holder(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise LockedError(f"another run holds the lock {self.path}{who}; "
                              "wait for it to finish") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _check_ours(self, fd: int) -> None:
        """Refuse a lock path that is not a plain file of ours: we write our pid into it."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise LedgerError(f"lock file {self.path} is not a plain file (a hard link or a special file); "
                              "remove it (a run creates a plain file there)")
        if not _PID_TEXT.fullmatch(os.pread(fd, 16, 0)):
            raise LedgerError(f"lock file {self.path} holds something other than a process id, so it is not "
                              "ours; move it away")

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

"""A journal of the remote temp files in flight, so that a killed run's partial uploads are found.

An upload first writes ``.<name>.part-<random>`` on the server and renames it into place at the end.
A run killed in between (SIGKILL, power loss, a dropped SSH session) leaves that partial file behind,
and from the server alone nobody can tell it apart from an upload still running elsewhere. So the
temp name is appended to ``WORKING_DIR/status.xml.partials`` (and flushed to disk) *before* the
remote file is opened, and a line marking it done is appended once it was renamed or removed. The
next run, under the run lock, removes exactly the files still open in the journal, and nothing else
on the server.

The file is append-only while a run works (``+NAME`` / ``-NAME`` lines, one ``fdatasync`` per
upload), so parallel uploads do not queue behind rewrites of it; it is removed when nothing is left
in flight.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

JOURNAL_SUFFIX = ".partials"
# Only names of this shape are ever removed: hidden, ".<base name>.part-<12 hex>", no folders.
PART_NAME = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.part-[0-9a-f]{12}")
_LIMIT = 1024 * 1024  # a journal is a few lines; a bigger file is not ours to read whole


class PartialsJournal:
    """The remote temp names in flight, kept in an append-only file; thread-safe."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._names: list[str] = self._read()
        # What earlier runs left; names this run adds are its own uploads in flight, never leftovers.
        self._inherited = frozenset(self._names)
        self._fd: int | None = None

    def _read(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                text = handle.read(_LIMIT).decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        names: list[str] = []
        for line in text.splitlines():
            mark, name = line[:1], line[1:]
            if not PART_NAME.fullmatch(name):
                continue  # not of our shape: never removed
            if mark == "+" and name not in names:
                names.append(name)
            elif mark == "-" and name in names:
                names.remove(name)
        return names

    def leftovers(self) -> list[str]:
        """Temp names a previous run did not finish: each is to be removed on the server.

        Only names that were in the journal when it was opened: uploads of this run may already be
        in flight while the leftovers are being removed.
        """
        with self._lock:
            return [name for name in self._names if name in self._inherited]

    def add(self, name: str) -> None:
        """Record ``name`` before the remote file is created (durably: flushed to disk)."""
        if not PART_NAME.fullmatch(name):
            raise ValueError(f"not a temp name: {name!r}")
        with self._lock:
            self._names.append(name)
            flushing = os.dup(self._append(f"+{name}\n"))
        # Flushed outside the lock (through a descriptor of its own, which ``close`` cannot take away), so
        # that parallel uploads share the disk's flushes instead of queueing for them.
        try:
            os.fdatasync(flushing)
        finally:
            os.close(flushing)

    def discard(self, name: str) -> None:
        """Forget ``name``: the temp file was renamed into place or removed.

        Not flushed to disk: a crash that loses this line only makes the next run try to remove a
        file that is no longer there.
        """
        with self._lock:
            if name not in self._names:
                return
            self._names.remove(name)
            if self._names:
                self._append(f"-{name}\n")
            else:
                self._clear()

    def _append(self, line: str) -> int:
        """Append ``line`` (under the lock); return the file's descriptor."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o600)
        os.write(self._fd, line.encode())
        return self._fd

    def _clear(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Release the file (it stays while names are in flight)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

"""A journal of the remote temp files in flight, so that a killed run's partial uploads are found.

An upload first writes ``.<name>.part-<random>`` on the server and renames it into place at the end.
A run killed in between (SIGKILL, power loss, a dropped SSH session) leaves that partial file behind,
and from the server alone nobody can tell it apart from an upload still running elsewhere. So the
temp name is written to ``WORKING_DIR/status.xml.partials`` (and flushed to disk) *before* the remote
file is opened, and taken out once it was renamed or removed. The next run, under the run lock,
removes exactly the files the journal names, and nothing else on the server.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from broker_sftp_uploader.atomic import atomic_write

JOURNAL_SUFFIX = ".partials"
# Only names of this shape are ever removed: hidden, ".<base name>.part-<12 hex>", no folders.
PART_NAME = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.part-[0-9a-f]{12}")


class PartialsJournal:
    """The list of remote temp names in flight, kept in a file; thread-safe."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._names: list[str] = self._read()

    def _read(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        # Anything not of our shape is ignored (never removed): the file is ours, but trust is cheap.
        return [line for line in text.splitlines() if PART_NAME.fullmatch(line)]

    def leftovers(self) -> list[str]:
        """Temp names a previous run did not finish: each is to be removed on the server."""
        with self._lock:
            return list(self._names)

    def add(self, name: str) -> None:
        """Record ``name`` before the remote file is created (durably: flushed to disk)."""
        if not PART_NAME.fullmatch(name):
            raise ValueError(f"not a temp name: {name!r}")
        with self._lock:
            self._names.append(name)
            self._save()

    def discard(self, name: str) -> None:
        """Forget ``name``: the temp file was renamed into place or removed."""
        with self._lock:
            if name in self._names:
                self._names.remove(name)
                self._save()

    def _save(self) -> None:
        if not self._names:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        with atomic_write(self.path, mode=0o600) as handle:
            handle.write("".join(f"{name}\n" for name in self._names).encode("utf-8"))

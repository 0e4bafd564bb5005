"""Progress of the transfers for a person at a terminal: one line, redrawn, with bytes, rate and ETA.

Uploads run in several threads at once; each reports the bytes it sent to its ``Transfer``, and a
thread of its own redraws the line a few times a second until ``close()``, e.g.::

    ↑ 3 uploads 45.1 MiB of 120.0 MiB, 52.3 MiB/s, 0:01 left (7 of 10 done)

Nothing is drawn unless the run was started with progress on (the CLI decides: on a terminal by
default). The line is erased before any log message is printed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait
from typing import TextIO

from broker_sftp_uploader.concurrency import Cancellation, in_background
from broker_sftp_uploader.engine.report import format_bytes

REDRAW_EVERY = 0.25


class Transfer:
    """One upload's counters; ``advance`` is called from the uploading thread."""

    def __init__(self, name: str, total: int | None):
        self.name = name
        self.total = total
        self.sent = 0
        self.started = time.monotonic()

    def advance(self, count: int) -> None:
        self.sent += count

    def describe(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.sent / elapsed
        if self.total:
            left = max(self.total - self.sent, 0) / rate if rate > 0 else None
            eta = f", {int(left // 60)}:{int(left % 60):02d} left" if left is not None else ""
            return (f"{self.name} {format_bytes(self.sent)} of {format_bytes(self.total)}, "
                    f"{format_bytes(rate)}/s{eta}")
        return f"{self.name} {format_bytes(self.sent)}, {format_bytes(rate)}/s"


class Progress:
    """The progress line of a run; a no-op unless ``stream`` is given."""

    def __init__(self, stream: TextIO | None = None, planned: int = 0):
        self._stream = stream
        self.planned = planned
        self._done = 0
        self._active: list[Transfer] = []
        self._lock = threading.Lock()
        self._drawn = 0
        self._stop = Cancellation()
        self._redrawing: Future[None] | None = None
        if stream is not None:
            self._redrawing = in_background(self._redraw, name="progress")

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def start(self, name: str, total: int | None) -> Transfer:
        transfer = Transfer(name, total)
        with self._lock:
            self._active.append(transfer)
        return transfer

    def finish(self, transfer: Transfer) -> None:
        with self._lock:
            if transfer in self._active:
                self._active.remove(transfer)
                self._done += 1

    def _line(self) -> str:
        with self._lock:
            active, done = list(self._active), self._done
        if not active:
            return ""
        progress = f", {done} of {self.planned} done" if self.planned else ""
        if len(active) == 1:
            return f"↑ {active[0].describe()}{f' ({progress[2:]})' if progress else ''}"
        together = Transfer(f"{len(active)} uploads", None if any(t.total is None for t in active)
                            else sum(t.total for t in active))
        together.sent = sum(transfer.sent for transfer in active)
        together.started = min(transfer.started for transfer in active)
        return f"↑ {together.describe()}{f' ({progress[2:]})' if progress else ''}"

    def _redraw(self) -> None:
        while not self._stop.wait(REDRAW_EVERY):
            self.draw()

    def draw(self) -> None:
        """Redraw the line now."""
        if self._stream is None:
            return
        line = self._line()[:160]
        with self._lock:
            padding = " " * max(self._drawn - len(line), 0)
            self._stream.write(f"\r{line}{padding}\r" if line or self._drawn else "")
            self._stream.flush()
            self._drawn = len(line)

    def clear(self) -> None:
        """Erase the line (before a log message, and at the end)."""
        if self._stream is None:
            return
        with self._lock:
            if self._drawn:
                self._stream.write("\r" + " " * self._drawn + "\r")
                self._stream.flush()
                self._drawn = 0

    def close(self) -> None:
        """Stop redrawing and erase the line (call it in every case: the redrawing thread runs until then)."""
        self._stop.cancel()
        if self._redrawing is not None:
            wait([self._redrawing], timeout=1)
        self.clear()

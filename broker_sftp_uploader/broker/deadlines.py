"""Hard deadlines for network calls: a watchdog that cuts a connection when its call runs out of time.

A socket read timeout only bounds the wait for the *next* byte, so a server that sends one byte every
few seconds (or a header line at a time) keeps a call alive forever. Here a call creates a
``Deadline`` and hands it every socket it uses; a single daemon thread shuts those sockets down when
the deadline passes. The blocked read then fails at once, whatever stage the exchange is in
(connect, headers, body), and the caller sees ``Deadline.expired``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time


class Deadline:
    """One call's time limit and the sockets it used; ``expired`` turns true when the watchdog fired
    (or ``stop`` cut the call before its time: then ``stopped`` is true as well)."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self.stopped = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False

    def remaining(self) -> float:
        """Seconds left (0 when past)."""
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket | None) -> None:
        """Cut ``sock`` when this deadline passes (at once if it already has)."""
        if sock is None:
            return
        with self._lock:
            if self._done:
                return
            if self.expired:
                _shutdown(sock)
                return
            self._sockets.append(sock)

    def fire(self) -> None:
        """Called by the watchdog: shut down every socket of the call."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def stop(self) -> None:
        """Cut the call now, before its time (the run is ending)."""
        self.stopped = True
        self.fire()

    def finish(self) -> None:
        """The call is over: forget its sockets (they go back to the pool)."""
        with self._lock:
            self._done = True
            self._sockets = []


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """A daemon thread that fires deadlines in time order."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._condition:
            heapq.heappush(self._heap, (deadline.at, next(self._counter), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._heap:
                    self._condition.wait()
                at, _, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline.fire()


_watchdog = _Watchdog()


def start_deadline(at: float) -> Deadline:
    """A deadline at ``at`` (a ``time.monotonic()`` value), armed; call ``finish()`` when the call is over."""
    deadline = Deadline(at)
    _watchdog.add(deadline)
    return deadline

"""One way to run work at once: ``concurrent.futures`` thread pools, all stopped through a ``Cancellation``.

A sync does four things at once: the broker's status calls (``BROKER.CONCURRENCY`` at a time), the uploads
(``SFTP.PARALLEL_UPLOADS`` at once), the download and encryption read ahead of a large upload, and the SFTP
login while the broker answers. Each runs on a ``ThreadPoolExecutor`` (``Workers``, ``map_in_threads``,
``in_background``), and each stops the same way: a ``Cancellation`` keeps the first reason to stop (an
interrupt the main thread caught, the run's deadline, a worker's failure) and, at that moment, runs the
callbacks registered to cut blocked I/O short.

Signals reach only the main thread, so the main thread is the one that waits for the workers and turns an
interrupt into a cancellation. Unlike daemon threads, a pool's threads are joined when the interpreter exits,
so cancelled work must end by itself, promptly: workers look at the cancellation between steps (an SFTP
upload between two writes), and a network call blocked in a read ends at its hard deadline or is cut by an
``on_cancel`` callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

# After a cancellation, how long the main thread waits for the work in flight to stop (an upload removes
# its partial file) before it goes on with the reason; what is still running then ends on its own.
STOP_GRACE = 30.0

Item = TypeVar("Item")
Result = TypeVar("Result")


class Cancelled(Exception):
    """Work that stopped, or never started, because its ``Cancellation`` was cancelled (``reason``: why)."""

    def __init__(self, reason: BaseException | None = None):
        super().__init__("cancelled" if reason is None else f"cancelled: {reason}")
        self.reason = reason


class Cancellation:
    """Why some concurrent work must stop; the first reason given wins, later ones are ignored.

    Workers look at it between steps (``is_set``, ``check``); whoever learns of a reason to stop calls
    ``cancel``, which runs the ``on_cancel`` callbacks once, in that thread. ``is_set`` and ``wait`` have
    ``threading.Event``'s names, so a cancellation can stand where code polls a stop event.

    :param deadline: a ``time.monotonic()`` value: from then on the cancellation counts as cancelled with
        ``expired()`` as its reason, as soon as anybody looks (no thread watches the clock).
    """

    def __init__(self, deadline: float | None = None,
                 expired: Callable[[], BaseException] = lambda: TimeoutError("the deadline passed")):
        self._deadline = deadline
        self._expired = expired
        self._reason: BaseException | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._event = threading.Event()

    def cancel(self, reason: BaseException | None = None) -> bool:
        """Cancel for ``reason`` (default: a plain ``Cancelled``) unless cancelled already; run the callbacks.

        :returns: whether this call cancelled (False: an earlier reason stands).
        """
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason if reason is not None else Cancelled()
            callbacks, self._callbacks = self._callbacks, []
        self._event.set()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - one cut that fails must not keep the others from running
                logger.debug("a cancellation callback failed", exc_info=True)
        return True

    @property
    def reason(self) -> BaseException | None:
        """Why the work stops, or None while it may go on."""
        if self._reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.cancel(self._expired())
        return self._reason

    def is_set(self) -> bool:
        """True once cancelled."""
        return self.reason is not None

    def check(self) -> None:
        """Return if the work may go on.

        :raises Cancelled: it must stop (with the reason).
        """
        reason = self.reason
        if reason is not None:
            raise Cancelled(reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until cancelled or ``timeout`` seconds passed (None: no limit); return ``is_set()``."""
        if self._deadline is not None:
            left = max(0.0, self._deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        self._event.wait(timeout)
        return self.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, woken early by a cancellation.

        :raises Cancelled: cancelled before or during the sleep.
        """
        if self.wait(seconds):
            raise Cancelled(self.reason)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Have ``callback()`` run when this is cancelled (at once if it is already)."""
        with self._lock:
            if self._reason is None:
                self._callbacks.append(callback)
                return
        callback()


class Workers(Generic[Item, Result]):
    """``function`` applied to each of ``items`` on up to ``count`` threads of a ThreadPoolExecutor.

    Use as a context manager: the threads start on entering, each taking the next item when it is free
    (one future per thread, not per item, so a thousand short calls cost little more than the calls).
    The results are collected as they arrive, with ``batches``. No item is taken once ``cancellation``
    is set. A call that raises cancels it with what it raised; so does leaving the block by an
    exception (an interrupt in the main thread), after which the calls in flight get ``grace`` seconds
    to stop before the exception goes on.

    A batch counts as taken only when the consumer asks for the next one: an interrupt that lands while
    the consumer handles a batch leaves it in ``arrived_meanwhile`` (so results are handed over at least
    once, never lost between the two).
    """

    def __init__(self, function: Callable[[Item], Result], items: Sequence[Item], count: int,
                 cancellation: Cancellation, *, name: str, grace: float = STOP_GRACE):
        self._function = function
        self._items = items
        self._count = max(1, min(count, len(items)))
        self._cancellation = cancellation
        self._name = name
        self._grace = grace
        self._positions = iter(range(len(items)))
        self._arrived: list[Result] = []
        self._handed = 0  # how many of ``_arrived`` the consumer has been given (the current batch)
        self._running = 0
        self._changed = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._threads: list[Future[None]] = []

    def __enter__(self) -> Workers[Item, Result]:
        self._executor = ThreadPoolExecutor(max_workers=self._count, thread_name_prefix=self._name)
        self._running = self._count
        self._threads = [self._executor.submit(self._work) for _ in range(self._count)]
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, *rest: object) -> None:
        assert self._executor is not None
        if error is None:
            self._executor.shutdown(wait=True)
            return
        self._cancellation.cancel(error)  # the first reason stands: a failure that came first stays it
        self._executor.shutdown(wait=False)
        wait(self._threads, timeout=self._grace)

    def _work(self) -> None:
        try:
            while (position := self._take()) is not None:
                result = self._function(self._items[position])
                with self._changed:
                    self._arrived.append(result)
                    self._changed.notify()
        except BaseException as failure:  # noqa: BLE001 - the cancellation carries it to the main thread
            self._cancellation.cancel(failure)
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify()

    def _take(self) -> int | None:
        if self._cancellation.is_set():
            return None
        with self._changed:
            return next(self._positions, None)

    def batches(self) -> Iterator[list[Result]]:
        """The results, a batch at a time as they arrive (each batch: all that arrived since the last one),
        until every thread has ended. Whether all items were done: ``not_started`` and the cancellation."""
        while True:
            with self._changed:
                del self._arrived[:self._handed]  # the consumer is done with the previous batch
                self._handed = 0
                while not self._arrived and self._running:
                    self._changed.wait()
                batch = list(self._arrived)
                self._handed = len(batch)
            if not batch:
                return
            yield batch

    def arrived_meanwhile(self) -> list[Result]:
        """The results not yet taken from ``batches``, the batch being handled when the block was left
        early included."""
        with self._changed:
            batch, self._arrived, self._handed = self._arrived, [], 0
        return batch

    def not_started(self) -> list[Item]:
        """The items no thread took, because the work was cancelled first (call it once the work ended)."""
        with self._changed:
            return [self._items[position] for position in self._positions]


def map_in_threads(function: Callable[[Item], Result], items: Sequence[Item], workers: int,
                   cancellation: Cancellation | None = None, *, name: str = "worker") -> list[Result]:
    """``[function(item) for item in items]`` on up to ``workers`` threads; the results in the items' order.

    :raises BaseException: the cancellation's reason when not every call was made: the first exception a
        call raised (no call starts after it), or why ``cancellation`` was cancelled otherwise.
    """
    cancellation = cancellation or Cancellation()
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            _raise_reason(cancellation)
            results.append(function(item))
        return results
    placed: list[Result | None] = [None] * len(items)

    def call(position: int) -> tuple[int, Result]:
        return position, function(items[position])

    done = 0
    with Workers(call, range(len(items)), workers, cancellation, name=name) as calls:
        for batch in calls.batches():
            for position, result in batch:
                placed[position] = result
            done += len(batch)
    if done < len(items):  # the threads stopped early: only a cancellation does that
        raise cancellation.reason or Cancelled()
    return placed  # type: ignore[return-value] - every position was filled


def _raise_reason(cancellation: Cancellation) -> None:
    reason = cancellation.reason
    if reason is not None:
        raise reason


def in_background(function: Callable[[], Result], *, name: str) -> Future[Result]:
    """Start ``function()`` on a thread of its own; its future's ``result()`` waits for it and raises what it
    raised."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    future = executor.submit(function)
    executor.shutdown(wait=False)  # the thread ends with the call
    return future

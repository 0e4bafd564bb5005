"""Read a stream ahead in a thread of its own, so producing data and sending it overlap.

An upload's source is the broker download followed by the Fernet encryption; its sink is the SFTP
writer. Run in one thread they take turns. ``Prefetcher`` reads the source in another thread into a
small bounded queue (so memory stays at a few pieces), and the writer takes pieces as they come:
while paramiko frames and sends one piece, the next is downloaded and encrypted (AES, HMAC and the
socket reads run outside the GIL).
"""

from __future__ import annotations

import queue
import threading
from typing import BinaryIO

PIECE_SIZE = 256 * 1024
DEPTH = 4  # pieces read ahead: 1 MiB


class Prefetcher:
    """A readable stream over ``source``, read ahead by a daemon thread; ``close()`` when done."""

    def __init__(self, source: BinaryIO, piece_size: int = PIECE_SIZE, depth: int = DEPTH):
        self._source = source
        self._piece_size = piece_size
        self._pieces: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._buffer = b""
        self._ended = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._closing.is_set():
                piece = self._source.read(self._piece_size)
                self._put(piece)
                if not piece:
                    return
        except BaseException as error:  # noqa: BLE001 - handed over to the reading thread
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._closing.is_set():
            try:
                self._pieces.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if negative); ``b""`` at the end; the source's errors raise."""
        while not self._ended and (size < 0 or len(self._buffer) < size):
            item = self._pieces.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
            self._buffer += item
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def close(self) -> None:
        """Stop reading ahead. The thread ends after its current read; closing the source (next, by
        the caller) cuts that read short if it hangs."""
        self._closing.set()
        while True:  # unblock a producer waiting for room
            try:
                self._pieces.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=1.0)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

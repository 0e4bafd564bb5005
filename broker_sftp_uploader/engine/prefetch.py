"""Read a stream ahead in a thread of its own, so producing data and sending it overlap.

An upload's source is the broker download followed by the Fernet encryption; its sink is the SFTP
writer. Run in one thread they take turns. ``Prefetcher`` reads the source in another thread into a
small bounded queue (so memory stays at a few pieces), and the writer takes pieces as they come:
while paramiko frames and sends one piece, the next is downloaded and encrypted (AES, HMAC and the
socket reads run outside the GIL).
"""

from __future__ import annotations

import queue
from concurrent.futures import wait
from typing import BinaryIO

from broker_sftp_uploader.concurrency import Cancellation, in_background

PIECE_SIZE = 256 * 1024
DEPTH = 4  # pieces read ahead: 1 MiB
STOP_WAIT = 1.0  # how long close() waits for the reading thread; closing the source cuts a read that hangs


class Prefetcher:
    """A readable stream over ``source``, read ahead in a thread of its own; ``close()`` when done."""

    def __init__(self, source: BinaryIO, piece_size: int = PIECE_SIZE, depth: int = DEPTH):
        self._source = source
        self._piece_size = piece_size
        self._pieces: queue.Queue[bytes] = queue.Queue(maxsize=depth)
        self._buffer = b""
        self._ended = False
        self._closing = Cancellation()
        self._producer = in_background(self._produce, name="prefetch")

    def _produce(self) -> None:
        """Read the source into the queue; ``b""`` ends it however reading ended (the future says how)."""
        try:
            while not self._closing.is_set():
                piece = self._source.read(self._piece_size)
                if not piece:
                    return
                self._put(piece)
        finally:
            self._put(b"")

    def _put(self, piece: bytes) -> None:
        while not self._closing.is_set():
            try:
                self._pieces.put(piece, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if negative); ``b""`` at the end; the source's errors raise."""
        while not self._ended and (size < 0 or len(self._buffer) < size):
            piece = self._pieces.get()
            if not piece:
                self._ended = True
                self._producer.result()  # raises what reading the source raised
            self._buffer += piece
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def close(self) -> None:
        """Stop reading ahead. The thread ends after its current read; closing the source (next, by
        the caller) cuts that read short if it hangs."""
        self._closing.cancel()
        while True:  # unblock a producer waiting for room
            try:
                self._pieces.get_nowait()
            except queue.Empty:
                break
        wait([self._producer], timeout=STOP_WAIT)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

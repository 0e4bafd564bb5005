"""Ctrl-C and SIGTERM as KeyboardInterrupt, but never in the middle of a network protocol exchange.

Python raises KeyboardInterrupt at whatever bytecode the main thread is running. Inside paramiko
that can be halfway through sending an SFTP packet, which leaves the session unusable, so the
partial upload could no longer be removed. Code that talks to a server wraps each call in
``deferred()``: a signal arriving there is held back and raised when the call has finished. A
second signal while one is held back is raised at once, for an operator who will not wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_depth = 0
_pending = False


def install() -> None:
    """Route SIGINT and SIGTERM (cron or systemd stopping us) through the deferring handler."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def _handle(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth and not _pending:
        _pending = True
        return
    _pending = False
    raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back an interrupt until the enclosed call is complete, then raise it.

    Only the main thread receives signals; in any other thread this does nothing (workers are
    stopped by their own means, between two requests).
    """
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt

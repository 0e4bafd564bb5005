"""A small HTTP/1.1 client for the broker: keep-alive connections per thread, hard deadlines, bounded bodies.

Why not ``requests``: a run makes one status call per tagged request, thousands on a large broker,
and ``requests`` spends about 1 ms of CPU per call under the GIL, five times what ``http.client``
needs; with a hard deadline per call that must reach the socket, the standard library is also the
simpler base. What ``requests`` gave that the broker needs is kept: TLS with the system's CAs or a
CA bundle, and the ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` variables.

Bodies are read in pieces and a ``Content-Encoding`` is inflated in bounded steps, so a body can be
capped by its *decoded* size and never sits whole in memory.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker_sftp_uploader.broker.deadlines import Deadline

READ_SIZE = 64 * 1024


class TransportError(Exception):
    """A failure on the way: ``reason`` is short and safe to show (no URLs' queries, no headers).

    ``retryable``: another attempt may work (connection trouble, a timeout, a cut body).
    """

    def __init__(self, reason: str, *, retryable: bool = True, received: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.received = received


class TooLargeError(Exception):
    """A body grew beyond the caller's limit."""


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    authorization: str | None


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The proxy the environment names for ``scheme://host``, as ``requests`` would pick it."""
    proxies = urllib.request.getproxies_environment()
    address = proxies.get(scheme)
    if not address or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    parts = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    authorization = None
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return _Proxy(parts.hostname or "", parts.port or 8080, authorization)


class Inflater:
    """Decodes a Content-Encoding in bounded steps: one input piece never expands past ``limit`` at once."""

    def __init__(self, encoding: str):
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._zlib = None
        elif encoding in ("gzip", "x-gzip", "deflate"):
            self._zlib = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip header, detected
        else:
            raise TransportError(f"unsupported Content-Encoding {encoding[:40]!r}", retryable=False)

    def decode(self, data: bytes, limit: int) -> Iterator[bytes]:
        if self._zlib is None:
            yield data
            return
        try:
            while data:
                piece = self._zlib.decompress(data, limit)
                data = self._zlib.unconsumed_tail
                if piece:
                    yield piece
        except zlib.error:
            raise TransportError("corrupt compressed body", retryable=False) from None


class Response:
    """A response whose body is read piece by piece; ``close()`` hands the connection back for reuse."""

    def __init__(self, pool: ConnectionPool, connection: http.client.HTTPConnection,
                 raw: http.client.HTTPResponse, deadline: Deadline):
        self._pool = pool
        self._connection = connection
        self._raw = raw
        self._deadline = deadline
        self.status = raw.status
        self.headers = raw.headers
        self.received = 0  # decoded body bytes so far
        self._inflater = Inflater(raw.headers.get("Content-Encoding", ""))
        self._done = False

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def pieces(self, limit: int | None = None) -> Iterator[bytes]:
        """Yield the decoded body in pieces of at most ``READ_SIZE`` bytes.

        :raises TooLargeError: more than ``limit`` decoded bytes arrived.
        :raises TransportError: the connection broke, timed out or was cut by the deadline.
        """
        while True:
            try:
                data = self._raw.read1(READ_SIZE) if not self._raw.isclosed() else b""
            except (OSError, http.client.HTTPException) as error:
                self._fail()
                raise TransportError(self._why(error), received=self.received) from None
            if not data:
                if self._deadline.expired:
                    self._fail()
                    raise TransportError("timed out", received=self.received)
                self._done = True
                return
            for piece in self._inflater.decode(data, READ_SIZE):
                self.received += len(piece)
                if limit is not None and self.received > limit:
                    self._fail()
                    raise TooLargeError(limit)
                yield piece

    def read_all(self, limit: int) -> bytes:
        return b"".join(self.pieces(limit))

    def watch_with(self, deadline: Deadline) -> None:
        """Let another deadline govern the rest of this body (a download lives longer than its call)."""
        self._deadline = deadline
        deadline.watch(self._connection.sock)

    def set_stall_timeout(self, seconds: float) -> None:
        """Fail a read that waits longer than ``seconds`` for the next byte."""
        if self._connection.sock is not None:
            self._connection.sock.settimeout(seconds)

    def _why(self, error: BaseException) -> str:
        if self._deadline.expired or isinstance(error, (socket.timeout, TimeoutError)):
            return "timed out"
        return _reason(error)

    def _fail(self) -> None:
        self._done = False
        self.close()

    def close(self) -> None:
        """Finish with the response: the connection is reused only after a complete, clean body."""
        if self._connection is None:
            return
        reusable = self._done and not self._raw.will_close and not self._deadline.expired
        self._raw.close()
        self._pool.release(self._connection, reusable)
        self._connection = None


class ConnectionPool:
    """Keep-alive connections to one server: at most one per thread, each reused while it stays clean."""

    def __init__(self, base_url: str, *, ca_bundle: Path | None = None, connect_timeout: float = 10.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self._proxy = _proxy_for(self.scheme, self.host)
        self._context: ssl.SSLContext | None = None
        if self.scheme == "https":
            self._context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    def _new_connection(self) -> http.client.HTTPConnection:
        host, port = (self._proxy.host, self._proxy.port) if self._proxy else (self.host, self.port)
        if self.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                                     context=self._context)
            if self._proxy:
                headers = {"Proxy-Authorization": self._proxy.authorization} if self._proxy.authorization else None
                connection.set_tunnel(self.host, self.port, headers=headers)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        with self._lock:
            self._all.add(connection)
        return connection

    def _target(self, path: str) -> str:
        if self._proxy and self.scheme == "http":  # a plain-HTTP proxy wants the absolute URI
            return f"http://{self.host}:{self.port}{self.base_path}{path}"
        return f"{self.base_path}{path}"

    def request(self, method: str, path: str, headers: dict[str, str], deadline: Deadline, *,
                fresh: bool = False) -> Response:
        """Send a request (no body) and return the response once its headers arrived.

        :param fresh: use a new connection (for calls that must not be retried: a kept-alive
            connection the server already closed would fail them for nothing).
        :raises TransportError: connecting, TLS, sending or reading the headers failed.
        """
        connection = None
        if not fresh:  # take this thread's kept-alive connection (a fresh call leaves it for later)
            connection, self._local.connection = getattr(self._local, "connection", None), None
        reused = connection is not None
        while True:
            if connection is None:
                connection = self._new_connection()
            remaining = max(deadline.remaining(), 0.001)
            try:
                if connection.sock is None:
                    connection.timeout = min(self.connect_timeout, remaining)
                    connection.connect()
                connection.sock.settimeout(remaining)
                deadline.watch(connection.sock)
                all_headers = dict(headers)
                if self._proxy and self._proxy.authorization and self.scheme == "http":
                    all_headers["Proxy-Authorization"] = self._proxy.authorization
                connection.request(method, self._target(path), headers=all_headers)
                raw = connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as error:
                self.release(connection, False)
                if reused and not deadline.expired:
                    # The server closed an idle kept-alive connection; nothing reached it: try a new one.
                    connection, reused = None, False
                    continue
                raise TransportError(self._why(error, deadline)) from None
            except ssl.SSLError as error:
                self.release(connection, False)
                raise TransportError(f"TLS error: {_tls_reason(error)}", retryable=False) from None
            except (OSError, http.client.HTTPException) as error:
                self.release(connection, False)
                raise TransportError(self._why(error, deadline)) from None
            return Response(self, connection, raw, deadline)

    @staticmethod
    def _why(error: BaseException, deadline: Deadline) -> str:
        if deadline.expired or isinstance(error, (socket.timeout, TimeoutError)):
            return "timed out"
        return _reason(error)

    def release(self, connection: http.client.HTTPConnection, reusable: bool) -> None:
        """Keep ``connection`` for this thread's next call, or close it."""
        if reusable and getattr(self._local, "connection", None) is None:
            self._local.connection = connection
            return
        connection.close()
        with self._lock:
            self._all.discard(connection)

    def close(self) -> None:
        """Close every connection of every thread."""
        with self._lock:
            connections, self._all = list(self._all), set()
        for connection in connections:
            connection.close()


def _tls_reason(error: ssl.SSLError) -> str:
    """The TLS failure in its own words: certificate, hostname, protocol."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    return (error.reason or error.__class__.__name__).replace("_", " ").lower()


def _reason(error: BaseException) -> str:
    """A short cause for a socket or protocol failure."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "name or service not known"
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return "connection reset"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(error, http.client.IncompleteRead):
        return "connection broken (incomplete body)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return error.__class__.__name__

"""The broker's HTTP transport: ``requests`` with a hard deadline per call, retries inside it, bounded bodies.

``requests`` (and urllib3 under it) does the HTTP: keep-alive pools, TLS, proxies (``CONNECT``, proxy
credentials, ``https://`` proxies), content decoding. What it lacks is added here, without replacing it:

* **A hard deadline per call.** The pool manager makes every connection from our connection classes
  (``pool_classes_by_scheme``), which hand their socket to the calling thread's ``Deadline``; the
  watchdog (deadlines.py) shuts it down when the call runs out of time, whatever the exchange is doing
  then: connecting, the proxy's ``CONNECT``, the TLS handshake, headers or body.
* **Retries inside that deadline.** urllib3's ``Retry``, mounted through the adapter, retries the
  idempotent calls (connection failures, 502/503/504) with exponential backoff and jitter and honours
  ``Retry-After``; our subclass gives up at once when the call must not be retried, when the deadline
  has passed or would pass during the wait, and when a proxy refuses (a 407 is not worth a retry). A
  kept-alive connection the server closed meanwhile is replaced without spending a retry, and a call
  that must not be retried (the export) gets a new connection of its own.
* **The environment, resolved once per run.** A ``requests.Session`` reads the environment on every
  call; here the proxy and CA bundle it would pick for the broker's URL (``HTTPS_PROXY``/``HTTP_PROXY``/
  ``ALL_PROXY``/``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``) are computed once with its own
  helpers, and the calls go straight to its adapter, so each of thousands of status calls skips that work.
* **Bodies in pieces, capped by their decoded size** (``BodyReader``): a compressed body is inflated a
  bounded piece at a time, so a gzip bomb cannot balloon.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import requests.adapters
import requests.utils
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from broker_sftp_uploader.broker.deadlines import Deadline

logger = logging.getLogger(__name__)


class _WithoutRoutineWarnings(logging.Filter):
    """urllib3 warns of every retry (``_DeadlineRetry`` logs its own line: cause and wait) and of every
    connection it closes rather than keeps (more calls at once than kept-alive connections); on a
    cron run's stderr, either would read like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Retrying", "Connection pool is full"))


logging.getLogger("urllib3.connectionpool").addFilter(_WithoutRoutineWarnings())

READ_SIZE = 64 * 1024
# A compressed body is read in small raw pieces: even a urllib3 that inflated a whole piece at once
# (before 2.6) could then not turn one piece into more than about 16 MiB.
ENCODED_READ_SIZE = 16 * 1024
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_STALE_RETRIES = 2
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})
_TUNNEL_REFUSAL = re.compile(r"Tunnel connection failed: (\d{3})\s*(.*)")
_IDENTITY = ("", "identity")


# ---- the call running on this thread -------------------------------------------------------------------

@dataclass
class Call:
    """What the connection classes and the retry policy need to know about the call on this thread.

    :ivar deadline: cuts the call's sockets when it passes.
    :ivar retry: whether a failed attempt may be tried again (idempotent calls only).
    :ivar sleep: how to wait between attempts (injectable so tests run fast).
    :ivar reused: whether the attempt in progress went out on a kept-alive connection.
    :ivar stale_retries: attempts repeated because a kept-alive connection turned out closed.
    """

    deadline: Deadline
    retry: bool
    sleep: Callable[[float], None]
    reused: bool = False
    stale_retries: int = 0


_thread = threading.local()


def current_call() -> Call | None:
    """The call running on this thread, or None outside a broker call."""
    return getattr(_thread, "call", None)


def set_current_call(call: Call | None) -> None:
    """Start (``call``) or end (None) this thread's broker call."""
    _thread.call = call


def _watch(handle: socket.socket | None) -> None:
    call = current_call()
    if call is not None and handle is not None:
        call.deadline.watch(handle)


# ---- connections the deadline can cut ------------------------------------------------------------------

class _CuttableConnection:
    """Mixed into urllib3's connection classes: the calling thread's deadline may cut the socket.

    The deadline gets a duplicate of the socket's descriptor, made as soon as the TCP connection
    exists: TLS wraps (and detaches) the original socket object, and a shutdown through the
    duplicate still ends the one connection both refer to, even in the middle of a handshake.
    """

    cut_handle: socket.socket | None = None
    served = 0  # requests sent over the current socket

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        self._drop_cut_handle()
        self.cut_handle = sock.dup()
        _watch(self.cut_handle)
        return sock

    def request(self, *args: object, **kwargs: object) -> None:
        call = current_call()
        if call is not None:
            call.reused = self.served > 0
            call.deadline.watch(self.cut_handle)  # a kept-alive connection serves a new call, a new deadline
        self.served += 1
        super().request(*args, **kwargs)  # type: ignore[misc]

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]
        finally:
            self._drop_cut_handle()
            self.served = 0

    def _drop_cut_handle(self) -> None:
        handle, self.cut_handle = self.cut_handle, None
        if handle is not None:
            handle.close()


class _HTTPConnection(_CuttableConnection, HTTPConnection):
    pass


class _HTTPSConnection(_CuttableConnection, HTTPSConnection):
    pass


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}


class _OneUse:
    """A pool that keeps no connection: every call gets a new one, closed after its answer.

    For the calls that are never retried (the export): a kept-alive connection may already be closing
    at the server's end (a server that honours "Connection: close" without saying so in its answer),
    and a request sent into it would fail for nothing.
    """

    def _put_conn(self, conn: HTTPConnection | None) -> None:
        if conn is not None:
            conn.close()
        super()._put_conn(None)  # type: ignore[misc]


class _OneUseHTTPConnectionPool(_OneUse, _HTTPConnectionPool):
    pass


class _OneUseHTTPSConnectionPool(_OneUse, _HTTPSConnectionPool):
    pass


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose pools (direct and through an HTTP(S) proxy) make cuttable connections.

    It serves one broker: one origin, one proxy and one CA bundle for all its calls, so the
    connection pool requests picks for the first call is the pool of every call (looked up again only
    once it was closed).
    """

    _pool: HTTPConnectionPool | None = None
    pool_classes = _POOL_CLASSES

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: bool | str,
                                        proxies: dict[str, str] | None = None,
                                        cert: object = None) -> HTTPConnectionPool:
        pool = self._pool
        if pool is None or pool.pool is None:
            pool = self._pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool

    def cert_verify(self, conn: HTTPConnectionPool, url: str, verify: bool | str, cert: object) -> None:
        # requests turns verification off for an http:// URL even when its connection is TLS to an
        # https:// proxy: that proxy is verified here like an HTTPS broker (same CA bundle).
        if isinstance(conn, HTTPSConnectionPool) and not url.lower().startswith("https:"):
            url = "https:" + url.split(":", 1)[1]
        super().cert_verify(conn, url, verify, cert)

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.pool_classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: object) -> urllib3.PoolManager:
        known = proxy in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not known and not proxy.lower().startswith("socks"):  # SOCKS pools have classes of their own
            manager.pool_classes_by_scheme = self.pool_classes
        return manager


class _OneUseAdapter(_Adapter):
    """An adapter whose every call gets a connection of its own (see ``_OneUse``)."""

    pool_classes = {"http": _OneUseHTTPConnectionPool, "https": _OneUseHTTPSConnectionPool}


# ---- retries inside the deadline -----------------------------------------------------------------------

class _DeadlineRetry(Retry):
    """urllib3's retries, as far as this thread's call allows: see the module's docstring."""

    planned_wait = 0.0

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        call = current_call()
        return call is not None and call.retry and super().is_retry(method, status_code, has_retry_after)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,  # noqa: ANN001
                  _stacktrace=None) -> _DeadlineRetry:
        call = current_call()
        if call is not None and call.reused and call.stale_retries < MAX_STALE_RETRIES and _dropped(error) \
                and method in IDEMPOTENT_METHODS and not call.deadline.expired:
            # The server (or a proxy: tinyproxy closes after every answer without saying so) closed
            # the kept-alive connection before this request reached it: try a new connection at once,
            # without spending a retry (urllib3 would even call it "Unable to connect to proxy").
            call.stale_retries += 1
            return self.new()
        cause = error or ResponseError(ResponseError.SPECIFIC_ERROR.format(
            status_code=response.status if response is not None else "no"))
        refusal = tunnel_refusal(error)
        if call is None or not call.retry or call.deadline.expired or (refusal and refusal[0] < 500):
            raise MaxRetryError(_pool, url, cause) from error
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when exhausted
        retry.planned_wait = retry._wait_before_next(response)
        if retry.planned_wait >= call.deadline.remaining():
            raise MaxRetryError(_pool, url, cause) from error
        if response is not None:
            # urllib3 would read the whole body of the refused answer to keep the connection: a
            # hostile broker's body may be endless. Close the connection instead.
            response.close()
            response.release_conn()
        logger.info("broker call %s failed (%s); retrying in %.1f s", url.split("?")[0] if url else "",
                    response.status if response is not None else short_reason(error), retry.planned_wait)
        return retry

    def _wait_before_next(self, response: urllib3.BaseHTTPResponse | None) -> float:
        """Seconds to wait before the next attempt: the answer's Retry-After, else the backoff."""
        if response is not None and self.respect_retry_after_header:
            try:
                after = self.get_retry_after(response)
            except InvalidHeader:
                after = None
            if after:
                return after
        return self.get_backoff_time()

    def sleep(self, response: urllib3.BaseHTTPResponse | None = None) -> None:
        call = current_call()
        if call is not None and self.planned_wait > 0:
            call.sleep(self.planned_wait)


def _dropped(error: BaseException | None) -> bool:
    """Whether the connection was closed under the request, before any answer."""
    return any(isinstance(cause, (ConnectionResetError, BrokenPipeError)) for cause in causes(error))


def tunnel_refusal(error: BaseException | None) -> tuple[int, str] | None:
    """``(status, reason)`` when ``error`` is a proxy's refusal of ``CONNECT``, else None."""
    for cause in causes(error):
        match = _TUNNEL_REFUSAL.match(str(cause)) if isinstance(cause, OSError) else None
        if match:
            return int(match.group(1)), match.group(2).strip()
    return None


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and every exception it wraps (requests → urllib3 → socket), outermost first."""
    seen: set[int] = set()
    todo = [error] if error is not None else []
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [getattr(current, "reason", None), getattr(current, "original_error", None),
                 current.__cause__, current.__context__, *current.args]
        todo.extend(item for item in inner if isinstance(item, BaseException))


def short_reason(error: BaseException | None) -> str:
    """The innermost cause of a transport failure in a few words, safe to show (no URL, no header)."""
    chain = list(causes(error))
    for cause in reversed(chain):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "name or service not known"
        if isinstance(cause, http.client.RemoteDisconnected):  # before its base class, ConnectionResetError
            return "the server closed the connection without answering"
        if isinstance(cause, (ConnectionResetError, BrokenPipeError)):
            return "connection reset"
        if isinstance(cause, http.client.IncompleteRead):
            return "connection broken (incomplete body)"
        if isinstance(cause, (socket.timeout, TimeoutError, urllib3.exceptions.TimeoutError)):
            return "timed out"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return chain[-1].__class__.__name__ if chain else "unknown error"


# ---- the environment, once per run ---------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """How ``requests`` would reach the broker from this process's environment.

    :ivar proxy: the proxy's URL, credentials included (never show it: see ``proxy_shown``), or None.
    :ivar proxy_variable: the environment variable that named the proxy, for messages.
    :ivar verify: the CA bundle (file or folder) to verify HTTPS with, or True for requests' own
        (certifi's).
    """

    proxy: str | None
    proxy_variable: str
    verify: str | bool

    @property
    def proxy_shown(self) -> str:
        """The proxy as ``scheme://host:port``, without credentials."""
        if self.proxy is None:
            return ""
        parts = urllib3.util.parse_url(requests.utils.prepend_scheme_if_needed(self.proxy, "http"))
        default_port = 443 if parts.scheme == "https" else 80  # as urllib3 dials it
        return f"{parts.scheme}://{parts.host}:{parts.port or default_port}"


def resolve_route(base_url: str, ca_bundle: Path | None) -> Route:
    """The proxy and CA bundle ``requests`` would use for ``base_url`` here (with ``trust_env``), once.

    The config's ``REQUESTS_CA_BUNDLE`` comes first (the original script put it into the environment,
    over whatever was there), then the environment's ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE``.
    """
    proxies = requests.utils.get_environ_proxies(base_url)  # {} when NO_PROXY covers the host
    proxy = requests.utils.select_proxy(base_url, proxies)
    scheme = urllib3.util.parse_url(base_url).scheme or "http"
    variable = "ALL_PROXY" if proxy is not None and proxies.get(scheme) != proxy else f"{scheme.upper()}_PROXY"
    verify: str | bool = (str(ca_bundle) if ca_bundle is not None else None) or \
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return Route(proxy, variable, verify)


class BrokerSession:
    """requests' HTTP adapter (one connection pool, shared by all threads) set up for one broker.

    Calls go straight to the adapter (``HTTPAdapter.send``), as ``Session.send`` would hand them on,
    without the session's per-call work this client has no use for: merging settings, the environment
    (resolved once instead), cookies (the broker sets none) and redirects (never followed, as before).
    The URL's base and the headers are prepared by requests once; each call appends its path.

    :param base_url: the broker's URL (its proxy and CA bundle are resolved once, here).
    :param ca_bundle: the config's ``REQUESTS_CA_BUNDLE``, or None.
    :param headers: sent with every call (the API key among them: never logged).
    :param retries: attempts after the first, for idempotent calls.
    :param retry_backoff: the backoff factor (and jitter) in seconds.
    :param pool_size: connections kept alive (at least the threads calling at once).
    """

    def __init__(self, base_url: str, *, ca_bundle: Path | None, headers: dict[str, str], retries: int,
                 retry_backoff: float, pool_size: int):
        self.route = resolve_route(base_url, ca_bundle)
        retry = _DeadlineRetry(total=retries, other=0, allowed_methods=IDEMPOTENT_METHODS,
                               status_forcelist=RETRY_STATUSES, backoff_factor=retry_backoff,
                               backoff_jitter=retry_backoff, raise_on_status=False, raise_on_redirect=False)
        self._adapter = _Adapter(pool_connections=2, pool_maxsize=pool_size, max_retries=retry)
        # Calls that must not be retried each get a new connection ("Connection: close" keeps none
        # for later), so that a kept-alive one the server closed meanwhile cannot fail them for nothing.
        self._fresh_adapter = _OneUseAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=retry)
        self._base = requests.Request("GET", base_url).prepare().url.rstrip("/")
        self._headers = headers
        self._prepared_headers: dict[tuple[str, bool], requests.structures.CaseInsensitiveDict] = {}
        self._proxies = {urllib3.util.parse_url(base_url).scheme: self.route.proxy} if self.route.proxy else {}

    def prepare(self, method: str, target: str, accept: str, fresh: bool = False) -> requests.PreparedRequest:
        """The request for ``target`` (a path below the base URL, with its query already %-encoded).

        :param fresh: ask the server to close the connection after its answer.
        """
        headers = self._prepared_headers.get((accept, fresh))
        if headers is None:
            wanted = {**self._headers, "Accept": accept, **({"Connection": "close"} if fresh else {})}
            headers = self._prepared_headers[accept, fresh] = requests.Request(method, self._base,
                                                                               headers=wanted).prepare().headers
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self._base + target
        prepared.headers = headers.copy()
        return prepared

    def send(self, method: str, target: str, accept: str, timeout: tuple[float, float], *,
             fresh: bool = False) -> requests.Response:
        """Send a request without a body; the response's body is left unread (see ``BodyReader``).

        :param target: the path below the base URL, with its query already %-encoded.
        :param timeout: (connect, read) seconds for the socket, as requests takes them.
        :param fresh: on a new connection, closed after the answer (for calls that are not retried).
        :raises requests.RequestException, OSError: the call failed (after any retries).
        """
        adapter = self._fresh_adapter if fresh else self._adapter
        return adapter.send(self.prepare(method, target, accept, fresh), stream=True, timeout=timeout,
                            verify=self.route.verify, cert=None, proxies=self._proxies)

    def close(self) -> None:
        """Close the idle kept-alive connections."""
        self._adapter.close()
        self._fresh_adapter.close()


# ---- bodies --------------------------------------------------------------------------------------------

class BodyError(Exception):
    """Reading a body failed; ``reason`` is short and safe to show, ``retryable`` false for bad content."""

    def __init__(self, reason: str, *, retryable: bool = True, received: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.received = received


class TooLargeError(Exception):
    """A body grew beyond its limit (in decoded bytes)."""


class BodyReader:
    """A response's body, decoded, in pieces of at most ``READ_SIZE`` bytes; ``received`` counts them.

    :param limit: the most decoded bytes accepted, or None.
    """

    def __init__(self, response: requests.Response, limit: int | None = None):
        self._response = response
        self._limit = limit
        self.received = 0
        self.complete = False
        self.encoding = response.headers.get("Content-Encoding", "").strip().lower()

    @property
    def encoded(self) -> bool:
        """Whether the body is compressed (its decoded size is then unknown in advance)."""
        return self.encoding not in _IDENTITY

    def __iter__(self) -> Iterator[bytes]:
        """The decoded pieces; a body that stops short of its Content-Length raises.

        :raises TooLargeError: more than ``limit`` decoded bytes arrived.
        :raises BodyError: the connection broke or was cut; the body's encoding is unknown or corrupt.
        """
        names = (name.strip() for name in self.encoding.split(","))
        if any(name not in _IDENTITY and name not in urllib3.HTTPResponse.CONTENT_DECODERS for name in names):
            # urllib3 would pass it through undecoded, and a download would be uploaded as it came.
            raise BodyError(f"unsupported Content-Encoding {self.encoding[:40]!r}", retryable=False)
        raw = self._response.raw
        try:
            for piece in raw.stream(ENCODED_READ_SIZE if self.encoded else READ_SIZE, decode_content=True):
                self.received += len(piece)
                if self._limit is not None and self.received > self._limit:
                    raise TooLargeError(self._limit)
                yield piece
        except urllib3.exceptions.DecodeError:
            raise BodyError("corrupt compressed body", retryable=False, received=self.received) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise BodyError(short_reason(error), received=self.received) from None
        self.complete = True

    def release(self) -> None:
        """Hand the connection back: kept alive after a complete body, closed otherwise."""
        raw = self._response.raw
        if not self.complete:
            raw.close()
        raw.release_conn()


def watch_body(response: requests.Response, deadline: Deadline) -> None:
    """Let ``deadline`` also cut the rest of ``response``'s body (a download outlives its call)."""
    connection = response.raw.connection
    deadline.watch(getattr(connection, "cut_handle", None))


def read_all(response: requests.Response, limit: int) -> bytes:
    """The whole decoded body (at most ``limit`` bytes), the connection released either way.

    :raises TooLargeError, BodyError: see ``BodyReader``.
    """
    body = BodyReader(response, limit)
    try:
        return b"".join(body)
    finally:
        body.release()

"""HTTP client for the AKTIN broker API (the wire contract: docs/broker-api.md).

Everything the broker sends is treated as untrusted:

* time: every call has a hard deadline (``deadlines.py`` cuts the connection when it passes), so a
  broker that never answers, or trickles, cannot hold a run; idempotent calls are retried with
  exponential backoff and jitter, but only while their deadline allows;
* memory: XML answers are parsed incrementally as they arrive and capped at ``MAX_XML_BYTES`` of
  *decoded* bytes; a compressed body is inflated in bounded steps, so a gzip bomb cannot balloon;
* content: XML is parsed with entities, DTDs and network off; request ids must be plain integers; the
  download uuid must look like one. Nothing the broker sends names a file: the download's
  Content-Disposition is ignored, and each request's remote file is ``export_<id>.zip`` (ledger.py).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from broker_sftp_uploader import __version__
from broker_sftp_uploader.broker.documents import (
    RequestListParser,
    StatusParser,
    feed_xml,
)
from broker_sftp_uploader.broker.deadlines import Deadline, start_deadline
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.errors import BrokerError
from broker_sftp_uploader.broker.http_client import ConnectionPool, Response, TooLargeError, TransportError

logger = logging.getLogger(__name__)

QUERY_MEDIA_TYPE = "application/vnd.aktin.query.request+xml"
USER_AGENT = f"broker-sftp-uploader/{__version__}"
CONCURRENCY = 32  # status calls at once: a small share of Jetty's 200 request threads
# A listing of 10,000 requests is about 1 MiB; a status list of 1,000 nodes about 0.2 MiB.
MAX_XML_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 60.0  # listing and status calls, retries included
EXPORT_TIMEOUT = 1800.0  # the broker builds the bundle before it answers the export call
RETRIES = 3
_RETRY_STATUSES = frozenset({502, 503, 504})

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class ResultStream:
    """A request's result bundle as a readable binary stream, straight from the broker's download.

    ``read`` never holds more than what was asked plus one network piece. At the end it checks the
    byte count against Content-Length, so a download cut short raises instead of ending quietly.
    The download runs under the run's deadline, and one that stalls for a call timeout fails.

    :ivar size: the announced size in bytes, or None if the broker did not send one.
    """

    def __init__(self, request_id: str, response: Response, deadline: Deadline):
        self.request_id = request_id
        self._response = response
        self._deadline = deadline
        encoded = response.header("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        length = response.header("Content-Length")
        self.size = int(length) if length.isdigit() and not encoded else None
        self._pieces = response.pieces()
        self._buffer = bytearray()
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` bytes (all the rest if negative); ``b""`` at the end.

        :raises BrokerError: the connection broke, timed out, or the download ended short of Content-Length.
        """
        while not self._ended and (size < 0 or len(self._buffer) < size):
            self._buffer += self._next_piece()
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _next_piece(self) -> bytes:
        try:
            piece = next(self._pieces, b"")
        except TransportError as error:
            if self._deadline.expired:
                raise BrokerError(f"download of request {self.request_id} did not finish within the run's "
                                  f"time limit (MISC.RUN_TIMEOUT); got {self.received} bytes") from None
            raise BrokerError(f"download of request {self.request_id} broke off after {self.received} "
                              f"bytes ({error.reason})") from None
        if not piece:
            self._ended = True
            if self.size is not None and self.received != self.size:
                raise BrokerError(f"download of request {self.request_id} is incomplete: "
                                  f"got {self.received} of {self.size} bytes")
        return piece

    @property
    def received(self) -> int:
        """Bytes of the bundle received so far."""
        return self._response.received

    def close(self) -> None:
        """Release the connection."""
        self._response.close()
        self._deadline.finish()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _backoff_delays(base: float, retries: int) -> Iterator[float]:
    """Full-jitter exponential backoff: a random wait in [0, base * 2**n] before retry n."""
    for attempt in range(retries):
        yield random.uniform(0, base * 2 ** attempt)


class BrokerClient:
    """Keep-alive connections to the broker's admin API (one per thread, so calls may run in parallel).

    :param base_url: e.g. ``http://localhost:8080`` (no trailing slash).
    :param api_key: the admin API key; sent only in the Authorization header, never logged.
    :param call_timeout: seconds for a listing or status call, retries included.
    :param export_timeout: seconds for the export call (never retried: it is not idempotent).
    :param retries: how often a failed idempotent call is tried again (within its timeout).
    :param run_deadline: a ``time.monotonic()`` value no call may run past (the run's overall limit).
    :param concurrency: how many status calls run at once.
    :param sleep: how to wait between retries (injectable so tests run fast).
    """

    def __init__(self, base_url: str, api_key: str, *, ca_bundle: Path | None = None,
                 call_timeout: float = CALL_TIMEOUT, export_timeout: float = EXPORT_TIMEOUT,
                 retries: int = RETRIES, retry_backoff: float = 0.5, run_deadline: float | None = None,
                 concurrency: int = CONCURRENCY, sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.call_timeout = call_timeout
        self.export_timeout = export_timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.run_deadline = run_deadline
        self.concurrency = concurrency
        self._sleep = sleep
        self._pool = ConnectionPool(self.base_url, ca_bundle=ca_bundle, connect_timeout=CONNECT_TIMEOUT)
        # Compression buys nothing for these small answers, and a body that inflates is one more risk.
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept-Encoding": "identity",
                         "User-Agent": USER_AGENT}

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._pool.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _deadline_in(self, seconds: float) -> float:
        at = time.monotonic() + seconds
        return at if self.run_deadline is None else min(at, self.run_deadline)

    def _call(self, method: str, path: str, accept: str, consume: Callable[[Response, Deadline], T],
              seconds: float, *, retries: int = 0, query: dict[str, str] | None = None) -> T:
        """Make one API call under a hard deadline and hand the response to ``consume``.

        Connection failures, timeouts and 502/503/504 are retried ``retries`` times with backoff,
        as long as the deadline leaves time for another attempt. ``consume`` owns the response.

        :raises BrokerError: the call failed for good; the message names the call, never the key.
        """
        target = path + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
        describe = f"{method} {path}"
        at = self._deadline_in(seconds)
        limit = max(1, round(at - time.monotonic()))
        delays = _backoff_delays(self.retry_backoff, retries)
        while True:
            deadline = start_deadline(at)
            try:
                return self._attempt(method, target, describe, accept, consume, deadline, fresh=not retries)
            except _Retryable as failure:
                if deadline.expired or deadline.remaining() <= 0.01:
                    raise BrokerError(f"broker at {self.base_url} did not answer {describe} within "
                                      f"{limit} s{failure.so_far}; check that the broker is healthy "
                                      f"(limits: {_LIMIT_KEYS})") from None
                problem = failure
            finally:
                deadline.finish()
            delay = next(delays, None)
            if delay is None or at - time.monotonic() <= delay:
                raise BrokerError(problem.message) from None
            logger.info("broker call %s failed (%s); retrying in %.1f s", describe, problem.message, delay)
            self._sleep(delay)

    def _attempt(self, method: str, target: str, describe: str, accept: str,
                 consume: Callable[[Response, Deadline], T], deadline: Deadline, fresh: bool) -> T:
        try:
            response = self._pool.request(method, target, {**self._headers, "Accept": accept}, deadline,
                                          fresh=fresh)
        except TransportError as error:
            if not error.retryable:
                raise BrokerError(f"{error.reason} talking to the broker at {self.base_url}; check BROKER.URL "
                                  "and REQUESTS_CA_BUNDLE") from None
            if error.reason == "timed out":
                raise _Retryable(f"broker at {self.base_url} did not answer {describe} in time", "timed out")
            raise _Retryable(f"cannot reach the broker at {self.base_url} ({error.reason}); "
                             "check BROKER.URL and that the broker is running", error.reason) from None
        status = response.status
        if status in _RETRY_STATUSES or not 200 <= status < 300:
            response.close()
            if status in _RETRY_STATUSES:
                raise _Retryable(f"broker answered {status} to {describe}", str(status))
            raise BrokerError(_status_message(status, describe))
        try:
            return consume(response, deadline)
        except TransportError as error:
            response.close()
            if not error.retryable:
                raise BrokerError(f"broker's answer to {describe} is unreadable ({error.reason})") from None
            raise _Retryable(f"the answer to {describe} broke off after {error.received} bytes ({error.reason})",
                             error.reason, f" (got {error.received} bytes)") from None
        except TooLargeError:
            raise BrokerError(f"broker's answer to {describe} is larger than {MAX_XML_BYTES // 1048576} MiB, "
                              "far more than a real broker sends; refusing it (is BROKER.URL the AKTIN "
                              "broker?)") from None
        except BaseException:
            response.close()
            raise

    def _read_xml(self, path: str, handler: RequestListParser | StatusParser,
                  query: dict[str, str] | None = None) -> None:
        """GET an XML document into ``handler``, retrying transient failures within the call's deadline."""

        def consume(response: Response, deadline: Deadline) -> None:
            try:
                feed_xml(response.pieces(MAX_XML_BYTES), handler)
            finally:
                response.close()

        self._call("GET", path, "application/xml", consume, self.call_timeout, retries=self.retries, query=query)

    def check_status(self) -> None:
        """HEAD /broker/status, as the original does before anything else.

        :raises BrokerError: unreachable or not answering 200.
        """
        self._call("HEAD", "/broker/status", "application/xml", _close, self.call_timeout, retries=self.retries)

    def list_tagged_request_ids(self, tag: str) -> list[str]:
        """Ids (as strings) of the requests whose definition carries ``<tag>tag</tag>``."""
        handler = RequestListParser()
        self._read_xml("/broker/request/filtered", handler,
                       {"type": QUERY_MEDIA_TYPE, "predicate": f"//tag='{tag}'"})
        return handler.ids

    def get_completion(self, request_id: str) -> str:
        """The request's completion string (``"0.0"`` … ``"1.0"``) from its status list."""
        handler = StatusParser()
        self._read_xml(f"/broker/request/{request_id}/status", handler)
        return handler.completion

    def get_completions(self, request_ids: list[str]) -> dict[str, str]:
        """Completion of every request in ``request_ids``, ``concurrency`` calls at a time, in the given order.

        :raises BrokerError: the first failure (by position in ``request_ids``); the rest are abandoned.
        """
        completions = run_parallel(self.get_completion, request_ids, self.concurrency)
        return dict(zip(request_ids, completions))

    def api_key_role(self) -> str:
        """Tell what kind of key the API key is: ``"admin"``, ``"node"`` or ``"unknown"``.

        The broker answers 401 to an admin call both for a key it does not know and for a node
        (hospital) key, so this asks the node-only GET /broker/my/request instead: a node key gets
        200, an admin key 500 (the broker finds no node for it), an unknown key 401. One attempt,
        no retries: it only explains a refusal that already happened.

        :raises BrokerError: unreachable, too slow, or another answer.
        """
        describe = "GET /broker/my/request"
        deadline = start_deadline(self._deadline_in(self.call_timeout))
        try:
            headers = {**self._headers, "Accept": "application/xml"}
            response = self._pool.request("GET", "/broker/my/request", headers, deadline, fresh=True)
            response.close()  # the body (a node's request list) is not needed
        except TransportError as error:
            raise BrokerError(f"cannot ask the broker at {self.base_url} about the API key "
                              f"({error.reason})") from None
        finally:
            deadline.finish()
        roles = {200: "node", 500: "admin", 401: "unknown"}
        if response.status not in roles:
            raise BrokerError(_status_message(response.status, describe))
        return roles[response.status]

    def open_result(self, request_id: str) -> ResultStream:
        """Export the request's result bundle and open its download as a stream (close it after use).

        The export is not retried (each call builds a new bundle on the broker); the download GET is.

        :raises BrokerError: the export or the start of the download failed.
        """
        path = f"/broker/export/request-bundle/{request_id}"
        uuid = self._call("POST", path, "text/plain", _read_uuid, self.export_timeout)
        if not _UUID.fullmatch(uuid):
            raise BrokerError(f"broker export of request {request_id} returned no download id")
        # The download may last as long as the run may; it fails sooner only if it stalls.
        lifetime = start_deadline(self.run_deadline if self.run_deadline is not None
                                  else time.monotonic() + 7 * 86400)

        def keep(response: Response, deadline: Deadline) -> Response:
            response.watch_with(lifetime)
            response.set_stall_timeout(self.call_timeout)
            return response

        try:
            response = self._call("GET", f"/broker/download/{uuid}", "application/zip, */*", keep,
                                  self.call_timeout, retries=self.retries)
        except BaseException:
            lifetime.finish()
            raise
        return ResultStream(request_id, response, lifetime)


T = TypeVar("T")
_LIMIT_KEYS = "BROKER.CALL_TIMEOUT, BROKER.EXPORT_TIMEOUT, MISC.RUN_TIMEOUT"


class _Retryable(Exception):
    """A failure worth another attempt if time allows."""

    def __init__(self, message: str, reason: str, so_far: str = ""):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.so_far = so_far


def _status_message(status: int, describe: str) -> str:
    if status == 401:
        return (f"broker rejected the API key (401) for {describe}; check that BROKER.API_KEY is an "
                "admin key")
    if status == 404 and describe.endswith("/broker/status"):
        return (f"broker answered 404 to {describe}; check BROKER.URL (the server's root, without /broker "
                "at the end)")
    return f"broker answered {status} to {describe}"


def _close(response: Response, deadline: Deadline) -> None:
    response.close()


def _read_uuid(response: Response, deadline: Deadline) -> str:
    try:
        text = response.read_all(1024)
    finally:
        response.close()
    return text.decode("ascii", "replace").strip()


def run_parallel(function: Callable[[str], T], items: list[str], workers: int) -> list[T]:
    """``[function(item) for item in items]`` on up to ``workers`` daemon threads, results in order.

    The first exception (by position) is raised once the calls before it are done; no new calls
    start after a failure. Daemon threads, because a call stuck past an interrupt must not keep the
    process alive (every call has its own hard deadline anyway).
    """
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    results: list[object] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    positions = iter(range(len(items)))
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def work() -> None:
        while True:
            with lock:
                position = next(positions, None) if not errors else None
            if position is None:
                finished.release()
                return
            try:
                results[position] = function(items[position])
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                with lock:
                    errors[position] = error

    count = min(workers, len(items))
    for number in range(count):
        threading.Thread(target=work, name=f"broker-{number}", daemon=True).start()
    for _ in range(count):
        finished.acquire()
    if errors:
        raise errors[min(errors)]
    return results  # type: ignore[return-value]


def broker_client(config: Config, deadline: float) -> BrokerClient:
    """The broker client for ``config``, no call running past ``deadline`` (a ``time.monotonic()`` value)."""
    settings = config.broker
    return BrokerClient(settings.url, settings.api_key, ca_bundle=settings.ca_bundle,
                        call_timeout=settings.call_timeout, export_timeout=settings.export_timeout,
                        retries=settings.retries, run_deadline=deadline, concurrency=settings.concurrency)

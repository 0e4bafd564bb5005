"""The AKTIN broker's API, as this tool calls it (the wire contract: docs/broker-api.md).

The HTTP is ``requests``' (``session.py`` adds what it lacks). Everything the broker sends is treated
as untrusted:

* time: every call has a hard deadline (``deadlines.py`` cuts the connection when it passes), so a
  broker that never answers, or trickles, cannot hold a run; idempotent calls are retried by urllib3
  with exponential backoff and jitter (and ``Retry-After``), but only while their deadline allows;
* memory: XML answers are parsed incrementally as they arrive and capped at ``MAX_XML_BYTES`` of
  *decoded* bytes; a compressed body is inflated in bounded steps, so a gzip bomb cannot balloon;
* content: XML is parsed with entities, DTDs and network off; request ids must be plain integers; the
  download uuid must look like one. Nothing the broker sends names a file: the download's
  Content-Disposition is ignored, and each request's remote file is ``export_<id>.zip`` (ledger.py).
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import requests

from broker_sftp_uploader import __version__
from broker_sftp_uploader.broker.deadlines import Deadline, start_deadline
from broker_sftp_uploader.broker.documents import RequestListParser, StatusParser, feed_xml
from broker_sftp_uploader.broker.session import (
    BodyError,
    BodyReader,
    BrokerSession,
    Call,
    TooLargeError,
    causes,
    read_all,
    set_current_call,
    short_reason,
    tunnel_refusal,
    watch_body,
)
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.errors import BrokerError

logger = logging.getLogger(__name__)

T = TypeVar("T")
QUERY_MEDIA_TYPE = "application/vnd.aktin.query.request+xml"
USER_AGENT = f"broker-sftp-uploader/{__version__}"
# A listing of 10,000 requests is about 1 MiB; a status list of 1,000 nodes about 0.2 MiB.
MAX_XML_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# Kept-alive connections beyond the status calls: the downloads of the parallel uploads (at most 9)
# and the main thread's calls.
EXTRA_CONNECTIONS = 10
_SUCCESS = frozenset(range(200, 300))
_LIMIT_KEYS = "BROKER.CALL_TIMEOUT, BROKER.EXPORT_TIMEOUT, MISC.RUN_TIMEOUT"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class ResultStream:
    """A request's result bundle as a readable binary stream, straight from the broker's download.

    ``read`` never holds more than what was asked plus one network piece. At the end it checks the
    byte count against Content-Length, so a download cut short raises instead of ending quietly.
    The download runs under the run's deadline, and one that stalls for a call timeout fails.

    :ivar size: the announced size in bytes, or None if the broker did not send one.
    """

    def __init__(self, request_id: str, response: requests.Response, lifetime: Deadline,
                 finish: Callable[[Deadline], None]):
        self.request_id = request_id
        self._lifetime = lifetime
        self._finish = finish
        self._body = BodyReader(response)
        length = response.headers.get("Content-Length", "")
        self.size = int(length) if length.isdigit() and not self._body.encoded else None
        self._pieces = iter(self._body)
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
        except BodyError as error:
            if self._lifetime.stopped:
                raise BrokerError(f"download of request {self.request_id} was stopped after {self.received} "
                                  "bytes: the run is ending") from None
            if self._lifetime.expired:
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
        return self._body.received

    def close(self) -> None:
        """Release the connection (kept alive only after a complete download)."""
        self._body.release()
        self._finish(self._lifetime)

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BrokerClient:
    """Keep-alive connections to the broker's admin API; calls may run in parallel on several threads.

    The limits come from the caller (config.py holds their defaults).

    :param base_url: e.g. ``http://localhost:8080`` (no trailing slash).
    :param api_key: the admin API key; sent only in the Authorization header, never logged.
    :param call_timeout: seconds for a listing or status call, retries included.
    :param export_timeout: seconds for the export call (never retried: it is not idempotent).
    :param retries: how often a failed idempotent call is tried again (within its timeout).
    :param concurrency: how many status calls run at once.
    :param ca_bundle: the config's ``REQUESTS_CA_BUNDLE`` (before the environment's), or None.
    :param retry_backoff: seconds: the backoff factor and the jitter of the waits between attempts.
    :param run_deadline: a ``time.monotonic()`` value no call may run past (the run's overall limit).
    :param sleep: how to wait between retries (injectable so tests run fast).
    """

    def __init__(self, base_url: str, api_key: str, *, call_timeout: float, export_timeout: float,
                 retries: int, concurrency: int, ca_bundle: Path | None = None, retry_backoff: float = 0.5,
                 run_deadline: float | None = None, sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.call_timeout = call_timeout
        self.export_timeout = export_timeout
        self.retries = retries
        self.run_deadline = run_deadline
        self.concurrency = concurrency
        self._sleep = sleep
        # Compression buys nothing for these small answers, and a body that inflates is one more risk.
        headers = {"Authorization": f"Bearer {api_key}", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        self._session = BrokerSession(self.base_url, ca_bundle=ca_bundle, headers=headers, retries=retries,
                                      retry_backoff=retry_backoff, pool_size=concurrency + EXTRA_CONNECTIONS)
        self._route = self._session.route
        self._running: set[Deadline] = set()  # of calls and downloads in progress, for close()
        self._running_lock = threading.Lock()

    def close(self) -> None:
        """Close the keep-alive connections, cutting the calls and downloads other threads still run."""
        with self._running_lock:
            running = list(self._running)
        for deadline in running:
            deadline.stop()
        self._session.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self, at: float) -> Deadline:
        deadline = start_deadline(at)
        with self._running_lock:
            self._running.add(deadline)
        return deadline

    def _finish(self, deadline: Deadline) -> None:
        deadline.finish()
        with self._running_lock:
            self._running.discard(deadline)

    def _deadline_in(self, seconds: float) -> float:
        at = time.monotonic() + seconds
        return at if self.run_deadline is None else min(at, self.run_deadline)

    def _call(self, method: str, path: str, accept: str, consume: Callable[[requests.Response, Deadline], T],
              seconds: float, *, retry: bool, query: dict[str, str] | None = None,
              statuses: Collection[int] = _SUCCESS) -> T:
        """Make one API call under a hard deadline and hand the response to ``consume``, which owns it.

        With ``retry``, urllib3 retries connection failures, timeouts and 502/503/504 with backoff, as
        long as the deadline leaves time for another attempt; without, the call gets a new connection.

        :param statuses: the answers ``consume`` handles; any other is an error.
        :raises BrokerError: the call failed for good; the message names the call, never the key.
        """
        target = path
        if query:
            target += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        describe = f"{method} {path}"
        at = self._deadline_in(seconds)
        limit = max(1, round(at - time.monotonic()))
        deadline = self._start(at)
        set_current_call(Call(deadline, retry, self._sleep))
        try:
            remaining = max(deadline.remaining(), 0.001)
            try:
                response = self._session.send(method, target, accept, (min(CONNECT_TIMEOUT, remaining), remaining),
                                              fresh=not retry)
            except (requests.RequestException, OSError) as error:
                raise BrokerError(self._failure(error, describe, deadline, limit)) from None
            if response.status_code not in statuses:
                BodyReader(response).release()  # unread: the connection is closed
                raise BrokerError(self._status_message(response.status_code, describe))
            try:
                return consume(response, deadline)
            except BodyError as error:
                if deadline.stopped:
                    raise BrokerError(f"broker call {describe} was stopped: the run is ending") from None
                if deadline.expired:
                    raise BrokerError(f"broker at {self.base_url} did not answer {describe} within {limit} s "
                                      f"(got {error.received} bytes); check that the broker is healthy "
                                      f"(limits: {_LIMIT_KEYS})") from None
                if not error.retryable:
                    raise BrokerError(f"broker's answer to {describe} is unreadable ({error.reason})") from None
                raise BrokerError(f"the answer to {describe} broke off after {error.received} bytes "
                                  f"({error.reason}); check that the broker is healthy") from None
            except TooLargeError:
                raise BrokerError(f"broker's answer to {describe} is larger than {MAX_XML_BYTES // 1048576} "
                                  "MiB, far more than a real broker sends; refusing it (is BROKER.URL the "
                                  "AKTIN broker?)") from None
        finally:
            set_current_call(None)
            self._finish(deadline)

    def _failure(self, error: BaseException, describe: str, deadline: Deadline, limit: int) -> str:
        """The one-line message for a call that got no answer (after any retries)."""
        base, route = self.base_url, self._route
        if deadline.stopped:
            return f"broker call {describe} was stopped: the run is ending"
        if deadline.expired:
            return (f"broker at {base} did not answer {describe} within {limit} s; check that the broker is "
                    f"healthy (limits: {_LIMIT_KEYS})")
        refusal = tunnel_refusal(error)
        if refusal is not None:
            status, reason = refusal
            hint = (f"check the credentials in {route.proxy_variable}" if status in (401, 407)  # tinyproxy: 401
                    else f"check {route.proxy_variable} and NO_PROXY")
            return (f"proxy {route.proxy_shown} refused the connection to the broker at {base} ({status} "
                    f"{reason}); {hint}")
        if isinstance(error, requests.exceptions.SSLError):
            return (f"TLS error: {_tls_reason(error)} talking to the broker at {base}; check BROKER.URL and "
                    "REQUESTS_CA_BUNDLE")
        if isinstance(error, requests.exceptions.ProxyError):
            if any(isinstance(cause, ssl.SSLError) for cause in causes(error)):
                return (f"cannot reach the proxy {route.proxy_shown} (TLS error: {_tls_reason(error)}); check "
                        f"{route.proxy_variable} and REQUESTS_CA_BUNDLE")
            return (f"cannot reach the proxy {route.proxy_shown} ({short_reason(error)}); check "
                    f"{route.proxy_variable} and NO_PROXY")
        if isinstance(error, requests.exceptions.Timeout):
            return f"broker at {base} did not answer {describe} in time; check that the broker is healthy"
        if isinstance(error, requests.exceptions.ConnectionError):
            return (f"cannot reach the broker at {base} ({short_reason(error)}); check BROKER.URL and that "
                    "the broker is running")
        if isinstance(error, (requests.exceptions.InvalidSchema, requests.exceptions.InvalidProxyURL)):
            return f"cannot use the proxy {route.proxy_shown} named by {route.proxy_variable} ({error})"
        if str(error).startswith("Could not find a suitable TLS CA certificate bundle"):  # requests' own check
            return f"{error}; check REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE"
        return f"cannot call the broker at {base} ({short_reason(error)})"

    def _status_message(self, status: int, describe: str) -> str:
        """The one-line message for an answer the call cannot use."""
        proxy = self._route.proxy_shown
        if status == 407 and proxy:
            return (f"proxy {proxy} answered 407 Proxy Authentication Required to {describe}; check the "
                    f"credentials in {self._route.proxy_variable}")
        if status == 401:
            # Through a proxy, the 401 may be the proxy's (tinyproxy answers wrong credentials so).
            also = f", or the credentials in {self._route.proxy_variable} for the proxy {proxy}" if proxy else ""
            return (f"broker rejected the API key (401) for {describe}; check that BROKER.API_KEY is an "
                    f"admin key{also}")
        if status == 404 and describe.endswith("/broker/status"):
            return (f"broker answered 404 to {describe}; check BROKER.URL (the server's root, without /broker "
                    "at the end)")
        through = f" (through the proxy {proxy})" if proxy and status in (502, 503, 504) else ""
        return f"broker answered {status} to {describe}{through}"

    def _read_xml(self, path: str, handler: RequestListParser | StatusParser,
                  query: dict[str, str] | None = None) -> None:
        """GET an XML document into ``handler``, retrying transient failures within the call's deadline."""

        def consume(response: requests.Response, deadline: Deadline) -> None:
            body = BodyReader(response, MAX_XML_BYTES)
            try:
                feed_xml(iter(body), handler)
            finally:
                body.release()

        self._call("GET", path, "application/xml", consume, self.call_timeout, retry=True, query=query)

    def check_status(self) -> None:
        """HEAD /broker/status, as the original does before anything else.

        :raises BrokerError: unreachable or not answering 200.
        """
        self._call("HEAD", "/broker/status", "application/xml", _read_nothing, self.call_timeout, retry=True)

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


    def api_key_role(self) -> str:
        """Tell what kind of key the API key is: ``"admin"``, ``"node"`` or ``"unknown"``.

        The broker answers 401 to an admin call both for a key it does not know and for a node
        (hospital) key, so this asks the node-only GET /broker/my/request instead: a node key gets
        200, an admin key 500 (the broker finds no node for it), an unknown key 401. One attempt,
        no retries: it only explains a refusal that already happened.

        :raises BrokerError: unreachable, too slow, or another answer.
        """
        roles = {200: "node", 500: "admin", 401: "unknown"}

        def role(response: requests.Response, deadline: Deadline) -> str:
            BodyReader(response).release()  # the body (a node's request list) is not needed
            return roles[response.status_code]

        return self._call("GET", "/broker/my/request", "application/xml", role, self.call_timeout, retry=False,
                          statuses=roles)

    def open_result(self, request_id: str) -> ResultStream:
        """Export the request's result bundle and open its download as a stream (close it after use).

        The export is not retried (each call builds a new bundle on the broker); the download GET is.

        :raises BrokerError: the export or the start of the download failed.
        """
        return self.open_download(request_id, self.export_result(request_id))

    def export_result(self, request_id: str) -> str:
        """Have the broker build the request's result bundle; return its download id (a link that lives
        10 minutes from now and may be downloaded any number of times until then).

        :raises BrokerError: the export failed (it is not retried: each call builds a new bundle).
        """
        path = f"/broker/export/request-bundle/{request_id}"
        uuid = self._call("POST", path, "text/plain", _read_uuid, self.export_timeout, retry=False)
        if not _UUID.fullmatch(uuid):
            raise BrokerError(f"broker export of request {request_id} returned no download id")
        return uuid

    def open_download(self, request_id: str, uuid: str) -> ResultStream:
        """Open the download ``uuid`` (from ``export_result``) of the request's bundle as a stream; close it
        after use.

        :raises BrokerError: the start of the download failed (retried within the call's deadline).
        """
        # The download may last as long as the run may; it fails sooner only if it stalls (the socket's
        # read timeout stays the download call's).
        lifetime = self._start(self.run_deadline if self.run_deadline is not None
                               else time.monotonic() + 7 * 86400)

        def keep(response: requests.Response, deadline: Deadline) -> requests.Response:
            watch_body(response, lifetime)
            return response

        try:
            response = self._call("GET", f"/broker/download/{uuid}", "application/zip, */*", keep,
                                  self.call_timeout, retry=True)
        except BaseException:
            self._finish(lifetime)
            raise
        return ResultStream(request_id, response, lifetime, self._finish)


def _read_nothing(response: requests.Response, deadline: Deadline) -> None:
    read_all(response, 1024)  # a HEAD answer has no body: this only frees the connection for reuse


def _read_uuid(response: requests.Response, deadline: Deadline) -> str:
    return read_all(response, 1024).decode("ascii", "replace").strip()


def _tls_reason(error: BaseException) -> str:
    """The TLS failure in its own words: certificate, hostname, protocol."""
    for cause in causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return (cause.reason or cause.__class__.__name__).replace("_", " ").lower()
    return short_reason(error)


def broker_client(config: Config, deadline: float) -> BrokerClient:
    """The broker client for ``config``, no call running past ``deadline`` (a ``time.monotonic()`` value)."""
    settings = config.broker
    return BrokerClient(settings.url, settings.api_key, ca_bundle=settings.ca_bundle,
                        call_timeout=settings.call_timeout, export_timeout=settings.export_timeout,
                        retries=settings.retries, run_deadline=deadline, concurrency=settings.concurrency)

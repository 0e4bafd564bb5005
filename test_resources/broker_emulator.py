"""HTTP emulator of the AKTIN broker API, for tests (contract: `docs/broker-api.md`).

In-process::

    with BrokerEmulator() as broker:
        requests.head(broker.url + "/broker/status")

Standalone: ``python -m test_resources.broker_emulator [--host H] [--port P] [--port-file F] [--data-dir D]
[--tls-cert C --tls-key K]``.
Results and export bundles live on disk and are streamed in chunks, so GiB-sized results use constant memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from requests.structures import CaseInsensitiveDict

from test_resources import broker_xml as bx
from test_resources.broker_actors import ADMIN_KEY, NODE1_KEY, NODE2_KEY

DEFAULT_API_KEYS = {
    NODE1_KEY: "CN=Schwarzwaldklinik,O=Schwarzwaldklinik,L=Schwarzwald",
    NODE2_KEY: "CN=Plainsboro Teaching Hospital,O=Plainsboro Teaching Hospital,L=New Jersey",
    "xxxApiKey890": "CN=Grey Sloan Memorial Hospital,O=Grey Sloan Memorial Hospital,L=Seattle",
    ADMIN_KEY: "CN=Admin,O=AKTIN,OU=admin",
}
CHUNK_SIZE = 64 * 1024
XML, TEXT = "application/xml", "text/plain"
# The words a node may post: every status column but `deleted` (which 3.11 sets).
_STATUS_WORDS = set(bx.STATUS_COLUMNS) - {"deleted"}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
log = logging.getLogger(__name__)


class LoggedRequest(NamedTuple):
    """One received request: method, raw path (without query), raw query string, headers."""

    method: str
    path: str
    query: str
    headers: CaseInsensitiveDict


class HttpError(Exception):
    """Abort a handler with an empty-bodied error response."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _BodyError(Exception):
    """The request body is malformed or the client went away while sending it."""


class _Body:
    """Incremental reader of a request body (Content-Length or chunked transfer encoding)."""

    def __init__(self, rfile: BinaryIO, headers: CaseInsensitiveDict):
        self._rfile = rfile
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = "0" if self._chunked else headers.get("Content-Length", "0").strip()
        if not length.isdigit():
            raise _BodyError(f"bad Content-Length {length!r}")
        self._left = int(length)
        self._done = not self._chunked and self._left == 0

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        """Next piece of the body, at most `size` bytes; b"" at its end."""
        while self._left == 0:
            if self._done:
                return b""
            self._next_chunk()
        data = self._rfile.read(min(size, self._left))
        if not data:
            raise _BodyError("connection closed inside the request body")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._rfile.readline(1024)  # CRLF after the chunk data
            else:
                self._done = True
        return data

    def _next_chunk(self) -> None:
        """Read a chunk-size line (and the trailer after the last chunk)."""
        line = self._rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BodyError(f"bad chunk header {line!r}") from None
        if size:
            self._left = size
            return
        while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        self._done = True

    def read_all(self) -> bytes:
        """The whole (remaining) body; only for small bodies."""
        return b"".join(iter(self.read, b""))

    def drain(self) -> None:
        """Discard what the handler did not read, keeping the connection usable."""
        for _ in iter(self.read, b""):
            pass


@dataclass
class _Response:
    """A response: `body` bytes, or `length` bytes streamed from an open `stream`."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: BinaryIO | None = None  # sent instead of `body`, `length` bytes
    length: int = 0


def _xml(document: bx.El) -> _Response:
    """200 with a one-line XML document."""
    return _Response(200, [("Content-Type", XML)], bx.render(document))


def _file_response(stream: BinaryIO, headers: list[tuple[str, str]]) -> _Response:
    """200 streaming an open file."""
    return _Response(200, headers, stream=stream, length=os.fstat(stream.fileno()).st_size)


@dataclass(frozen=True)
class _Principal:
    """The authenticated caller."""

    dn: str
    node_id: int | None  # None for admin keys


@dataclass
class _Call:
    """What a handler gets to see of one request."""

    params: dict[str, str]
    query: dict[str, list[str]]
    headers: CaseInsensitiveDict
    body: _Body
    host: str
    principal: _Principal | None = None

    def int_param(self, name: str, status: int = 404) -> int:
        """Path parameter as Java int; `status` (404 = JAX-RS conversion failure) otherwise."""
        value = bx.java_int(self.params[name])
        if value is None:
            raise HttpError(status)
        return value

    def node(self) -> int:
        """The calling node's id; an admin key makes the broker throw (500)."""
        if self.principal is None or self.principal.node_id is None:
            raise HttpError(500)
        return self.principal.node_id

    def query_param(self, name: str) -> str | None:
        """First value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class _Result:
    """A node's uploaded result file and its stored media type."""

    media_type: str
    path: Path
    modified: float


@dataclass
class _Download:
    """An export bundle waiting for download."""

    path: Path
    request_id: int
    created: float
    expires: float  # time.monotonic() deadline


@dataclass
class _Fault:
    """A pending `inject_fault` entry."""

    method: str
    pattern: re.Pattern[str]
    status: int | None
    truncate_after: int | None
    delay: float
    remaining: int
    hostile: str | None = None  # one of HOSTILE_ANSWERS: answer like a broken or malicious server
    size: int = 0  # bytes for the hostile answers that have a size


# What a broken or malicious "broker" may do instead of answering (see `inject_hostile`).
HOSTILE_ANSWERS = {
    "silent": "accept the request and never answer",
    "trickle": "send a valid status line and headers, then one body byte per `delay` seconds, forever",
    "trickle_headers": "send the status line and headers one byte per `delay` seconds",
    "huge": "send a `size`-byte XML body of real-looking request elements (Content-Length set)",
    "gzip_bomb": "send a small gzip body that inflates to `size` bytes of XML",
    "endless": "send a chunked body of XML elements that never ends",
}


class _Endpoint(NamedTuple):
    """How a method on a route is answered."""

    handler: str  # the emulator method `_on_<handler>` answers the request
    auth: str | None = None  # None (no auth), "any" (admin or node key), "admin"
    produces: str | None = None
    consumes: str | None = None


def _routes() -> list[tuple[re.Pattern[str], dict[str, _Endpoint]]]:
    """Route table, literal paths before templates; a trailing slash is tolerated like Jersey does."""
    rid, node = "(?P<id>[^/]+)", "(?P<node>[^/]+)"
    table = {
        "/broker/status": {"GET": _Endpoint("status", None, XML)},
        "/broker/request": {"POST": _Endpoint("create", "admin"), "GET": _Endpoint("list", "admin", XML)},
        "/broker/request/filtered": {"GET": _Endpoint("filtered", "admin", XML)},
        f"/broker/request/{rid}": {
            "GET": _Endpoint("definition", "admin"),
            "PUT": _Endpoint("put_definition", "admin"),
            "DELETE": _Endpoint("delete", "admin"),
            "OPTIONS": _Endpoint("options", "admin"),
        },
        f"/broker/request/{rid}/publish": {"POST": _Endpoint("publish", "admin")},
        f"/broker/request/{rid}/close": {"POST": _Endpoint("close", "admin")},
        f"/broker/request/{rid}/status": {"GET": _Endpoint("request_status", "admin", XML)},
        f"/broker/request/{rid}/status/{node}": {"GET": _Endpoint("status_message", "admin")},
        f"/broker/request/{rid}/nodes": {
            "GET": _Endpoint("targets", "admin", XML),
            "PUT": _Endpoint("set_targets", "admin", None, XML),
            "DELETE": _Endpoint("clear_targets", "admin"),
        },
        "/broker/my/request": {"GET": _Endpoint("my_list", "any", XML)},
        f"/broker/my/request/{rid}": {
            "GET": _Endpoint("my_definition", "any"),
            "DELETE": _Endpoint("my_delete", "any"),
        },
        f"/broker/my/request/{rid}/status/(?P<status>[^/]+)": {"POST": _Endpoint("my_status", "any")},
        f"/aggregator/my/request/{rid}/result": {"PUT": _Endpoint("put_result", "any")},
        f"/aggregator/request/{rid}/result": {
            "GET": _Endpoint("results", "admin", XML),
            "DELETE": _Endpoint("delete_results", "admin"),
        },
        f"/aggregator/request/{rid}/result/{node}": {"GET": _Endpoint("result", "admin")},
        "/broker/node": {"GET": _Endpoint("nodes", "admin", XML)},
        f"/broker/node/{node}": {"GET": _Endpoint("node", "admin", XML)},
        f"/broker/export/request-bundle/{rid}": {"POST": _Endpoint("export", "admin", TEXT)},
        "/broker/download/(?P<uuid>[^/]+)": {"GET": _Endpoint("download")},
    }
    return [(re.compile(pattern + "/?"), methods) for pattern, methods in table.items()]


_ROUTES = _routes()


def _decode(data: bytes, content_type: str) -> str:
    """Body text in the Content-Type charset (malformed bytes replaced, like a Java Reader)."""
    try:
        return data.decode(bx.charset_of(content_type), errors="replace")
    except LookupError:
        raise HttpError(500) from None


def _status_time(date_header: str | None) -> datetime:
    """Timestamp for a node status: the request's `Date` header if valid, else now (ms precision)."""
    if date_header:
        try:
            moment = parsedate_to_datetime(date_header)
            if moment.tzinfo is not None:
                return moment
        except (TypeError, ValueError):
            pass
    return bx.now_millis()


def _write_bundle(
    path: Path,
    info: bx.RequestInfo,
    definitions: list[tuple[str, str]],
    rows: list[bx.StatusRow],
    results: list[tuple[int, str, BinaryIO, float]],
) -> None:
    """Write the export zip of §3.14; result files are streamed in chunks."""
    now = time.localtime()[:6]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.comment = f"Bundle for request {info.id}".encode()

        def put(name: str, data: bytes) -> None:
            bundle.writestr(zipfile.ZipInfo(name, now), data, zipfile.ZIP_DEFLATED)

        put("status.xml", bx.render(bx.status_list_doc(rows), pretty=True))
        for row in rows:
            if row.message is not None:
                put(f"{row.node}_info{bx.extension(row.message_type or '')}", row.message.encode("utf-8"))
        if info.targeted:
            put("node-restriction.xml", bx.render(bx.target_nodes_doc(info.targets), pretty=True))
        put(
            "request.xml", bx.render(bx.request_el(info, [t for t, _ in definitions], root=True), pretty=True)
        )
        for index, (media_type, text) in enumerate(definitions):
            suffix = "" if len(definitions) == 1 else f"_{index}"
            put(f"definition{suffix}{bx.extension(media_type)}", text.encode("utf-8"))
        one_type = len({media_type for _, media_type, _, _ in results}) == 1
        for node, media_type, stream, modified in results:
            label = "result" if one_type else bx.url_encode(media_type)
            entry = zipfile.ZipInfo(f"{node}_{label}{bx.extension(media_type)}", time.localtime(modified)[:6])
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.file_size = os.fstat(stream.fileno()).st_size  # lets zipfile pick zip64 when needed
            with bundle.open(entry, "w") as out:
                shutil.copyfileobj(stream, out, CHUNK_SIZE)


class BrokerEmulator:
    """The broker's HTTP API on a background ThreadingHTTPServer; all state in memory and `data_dir`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path | None = None,
        api_keys: dict[str, str] | None = None,
        download_lifetime: float = 600.0,
        latency: float = 0.0,
        tls: tuple[Path, Path] | None = None,
    ):
        self.host = host
        self.port = port
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._api_keys = dict(DEFAULT_API_KEYS if api_keys is None else api_keys)
        self._download_lifetime = download_lifetime
        self.latency = latency  # seconds added before every response, like a broker across a network
        # HTTPS with this (certificate chain file, private key file), as a broker behind a TLS proxy.
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(*tls)
        self.export_seconds: list[float] = []  # how long each bundle took to build (for benchmarks)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._dir = Path()
        self._owns_dir = False
        # Every received request in arrival order (appended under the lock; `.clear()` to reset).
        self.requests_log: list[LoggedRequest] = []
        self._faults: list[_Fault] = []
        self._server_stopping = threading.Event()  # ends the waiting hostile answers
        # Test hook: request id -> the file name a hostile broker puts into Content-Disposition.
        self.download_names: dict[int, str] = {}
        self._next_request_id = 0
        self._next_node_id = 0
        self._requests: dict[int, bx.RequestInfo] = {}
        self._definitions: dict[int, dict[str, str]] = {}  # request id -> media type -> text
        self._nodes: dict[str, bx.NodeInfo] = {}  # by client DN, in registration order
        self._status: dict[tuple[int, int], bx.StatusRow] = {}  # (request id, node id)
        self._results: dict[tuple[int, int], _Result] = {}
        self._downloads: dict[str, _Download] = {}

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> BrokerEmulator:
        """Bind the port and serve in a daemon thread."""
        self._server_stopping.clear()
        self._owns_dir = self._data_dir is None
        self._dir = Path(tempfile.mkdtemp(prefix="broker-emulator-")) if self._owns_dir else self._data_dir
        for sub in ("incoming", "results", "downloads"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="broker-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and remove the private data directory."""
        if self._server is None:
            return
        self._server_stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
        self._server = None
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        """Start; returns the emulator."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop."""
        self.stop()

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. `http://127.0.0.1:41234`."""
        return f"{'https' if self.tls_context else 'http'}://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        """Directory holding uploaded results and export bundles."""
        return self._dir

    # ------------------------------------------------------------------------------------- test hooks

    def inject_fault(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | None = None,
        truncate_after: int | None = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> None:
        """Disturb the next `times` requests whose method matches (`*` = any) and whose path (no query)
        matches `path_regex` (re.search): sleep `delay` seconds first, then answer `status` with an empty
        body instead of processing the request, or send the real response (full Content-Length) but
        close the connection after `truncate_after` body bytes."""
        if status is None and truncate_after is None and delay <= 0:
            raise ValueError("a fault needs a status, truncate_after or delay")
        if times < 1:
            raise ValueError("times must be at least 1")
        fault = _Fault(method.upper(), re.compile(path_regex), status, truncate_after, delay, times)
        with self._lock:
            self._faults.append(fault)

    def inject_hostile(self, method: str, path_regex: str, answer: str, *, delay: float = 1.0, size: int = 0,
                       times: int = 1) -> None:
        """Answer the next `times` matching requests like a hostile server would; `answer` is a key of
        HOSTILE_ANSWERS. The connection is closed afterwards."""
        if answer not in HOSTILE_ANSWERS:
            raise ValueError(f"answer must be one of {sorted(HOSTILE_ANSWERS)}")
        fault = _Fault(method.upper(), re.compile(path_regex), None, None, delay, times, answer, size)
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Remove all pending faults."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        """The first pending fault for this request, counting it down."""
        with self._lock:
            for fault in self._faults:
                if fault.method in ("*", method) and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # ---------------------------------------------------------------------------------- HTTP plumbing

    def _serve(self, handler: _Handler) -> None:
        """Answer one request: log it, apply faults, route, drain the body, send the response."""
        split = urlsplit(handler.path)
        headers = CaseInsensitiveDict()
        for name, value in handler.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        with self._lock:
            self.requests_log.append(LoggedRequest(handler.command, split.path, split.query, headers))
        if self.latency > 0:
            time.sleep(self.latency)
        fault = self._take_fault(handler.command, split.path)
        if fault is not None and fault.hostile is not None:
            handler.close_connection = True
            try:
                _answer_hostile(handler, fault, self._server_stopping)
            except OSError:
                pass
            return
        if fault is not None and fault.delay > 0:
            time.sleep(fault.delay)
        response = None
        try:
            body = _Body(handler.rfile, headers)
            if fault is not None and fault.status is not None:
                response = _Response(fault.status)
            else:
                response = self._respond(handler.command, split, headers, body)
            body.drain()
        except _BodyError:
            if response is not None and response.stream is not None:
                response.stream.close()
            response = _Response(400)
            handler.close_connection = True
        try:
            self._send(
                handler,
                response,
                handler.command == "HEAD",
                fault.truncate_after if fault is not None else None,
            )
        except OSError:
            handler.close_connection = True
        finally:
            if response.stream is not None:
                response.stream.close()

    def _respond(self, method: str, split, headers: CaseInsensitiveDict, body: _Body) -> _Response:
        """JAX-RS order: 404 path, 405 method, 406 Accept, 415 Content-Type, then auth, then handler."""
        path = unquote(split.path)
        for pattern, methods in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                break
        else:
            return _Response(404)
        endpoint = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if endpoint is None:
            allowed = set(methods) | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
            return _Response(200 if method == "OPTIONS" else 405, [("Allow", ",".join(sorted(allowed)))])
        if endpoint.produces and bx.quality(headers.get("Accept"), endpoint.produces) <= 0:
            return _Response(406)
        if endpoint.consumes and bx.base_type(headers.get("Content-Type", "")).lower() != endpoint.consumes:
            return _Response(415)
        call = _Call(
            match.groupdict(),
            parse_qs(split.query, keep_blank_values=True),
            headers,
            body,
            headers.get("Host") or f"{self.host}:{self.port}",
        )
        try:
            if endpoint.auth is not None:
                call.principal = self._authenticate(headers, admin_required=endpoint.auth == "admin")
            return getattr(self, "_on_" + endpoint.handler)(call)
        except HttpError as error:
            return _Response(error.status)
        except _BodyError:
            raise
        except Exception:
            log.exception("broker emulator handler %s failed", endpoint.handler)
            return _Response(500)

    @staticmethod
    def _send(handler: _Handler, response: _Response, head_only: bool, truncate_after: int | None) -> None:
        """Write status, headers (Content-Length except for 204) and the body, maybe truncated."""
        handler.send_response(response.status)
        for name, value in response.headers:
            handler.send_header(name, value)
        length = response.length if response.stream is not None else len(response.body)
        if response.status != 204:
            handler.send_header("Content-Length", str(length))
        handler.end_headers()
        if head_only:
            return
        budget = length if truncate_after is None else min(length, truncate_after)
        if response.stream is None:
            handler.wfile.write(response.body[:budget])
        while response.stream is not None and budget > 0:
            chunk = response.stream.read(min(CHUNK_SIZE, budget))
            if not chunk:
                break
            handler.wfile.write(chunk)
            budget -= len(chunk)
        if truncate_after is not None:
            handler.wfile.flush()
            handler.close_connection = True

    def _authenticate(self, headers: CaseInsensitiveDict, admin_required: bool) -> _Principal:
        """§2.1: `Bearer <key>` only; node keys register the node (even when then refused)."""
        value = headers.get("Authorization", "")
        dn = self._api_keys.get(value[len("Bearer ") :]) if value.startswith("Bearer ") else None
        if dn is None or dn.split(",")[-1] == "INACTIVE":
            raise HttpError(401)
        if "OU=admin" in dn:
            return _Principal(dn, None)
        with self._lock:
            node = self._nodes.get(dn)
            if node is None:
                node = self._nodes[dn] = bx.NodeInfo(self._next_node_id, dn, bx.now_millis())
                self._next_node_id += 1
            else:
                node.last_contact = bx.now_millis()
        if admin_required:
            raise HttpError(401)
        return _Principal(dn, node.id)

    # -------------------------------------------------------------------------------- admin: requests

    def _on_status(self, call: _Call) -> _Response:
        """§3.1 broker status (HEAD is derived from GET)."""
        return _xml(bx.broker_status_doc(time.time_ns()))

    def _on_create(self, call: _Call) -> _Response:
        """§3.2 create an unpublished request; the definition keeps its parameter-stripped type."""
        content_type = call.headers.get("Content-Type")
        data = call.body.read_all()
        definition = (bx.base_type(content_type), _decode(data, content_type)) if content_type else None
        with self._lock:
            request_id = self._next_request_id
            self._next_request_id += 1
            self._requests[request_id] = bx.RequestInfo(request_id)
            if definition is not None:
                self._definitions[request_id] = dict([definition])
        return _Response(201, [("Location", f"http://{call.host}/broker/request/{request_id}")])

    def _on_put_definition(self, call: _Call) -> _Response:
        """§3.16 add or replace a definition, without existence check."""
        content_type = call.headers.get("Content-Type")
        if not content_type:
            raise HttpError(500)
        request_id = call.int_param("id", 400)
        text = _decode(call.body.read_all(), content_type)
        with self._lock:
            self._definitions.setdefault(request_id, {})[bx.base_type(content_type)] = text
        return _Response(204)

    def _on_publish(self, call: _Call) -> _Response:
        """§3.3 publish once; 404 for unknown ids."""
        return self._set_once(call, "published")

    def _on_close(self, call: _Call) -> _Response:
        """§3.16 close once; 404 for unknown ids."""
        return self._set_once(call, "closed")

    def _set_once(self, call: _Call, attribute: str) -> _Response:
        """Set the `published`/`closed` timestamp unless already set."""
        request_id = call.int_param("id")
        with self._lock:
            info = self._requests.get(request_id)
            if info is None:
                raise HttpError(404)
            if getattr(info, attribute) is None:
                setattr(info, attribute, bx.now_micros())
        return _Response(204)

    def _on_delete(self, call: _Call) -> _Response:
        """§3.4 delete request row and definitions only; 204 for any numeric id."""
        request_id = call.int_param("id", 400)
        with self._lock:
            self._requests.pop(request_id, None)
            self._definitions.pop(request_id, None)
        return _Response(204)

    def _on_list(self, call: _Call) -> _Response:
        """§3.5 all requests having at least one definition."""
        with self._lock:
            items = [
                bx.request_el(info, list(self._definitions[rid]))
                for rid, info in sorted(self._requests.items())
                if self._definitions.get(rid)
            ]
            return _xml(bx.list_doc("request-list", items))

    def _on_definition(self, call: _Call) -> _Response:
        """§3.6 one definition chosen by the Accept header."""
        return self._negotiated_definition(call, call.int_param("id"))

    def _negotiated_definition(self, call: _Call, request_id: int) -> _Response:
        """First stored definition acceptable to the Accept header (§3.6)."""
        with self._lock:
            definitions = dict(self._definitions.get(request_id, {}))
        if not definitions:
            raise HttpError(404)
        for media_type, text in definitions.items():
            if bx.quality(call.headers.get("Accept"), media_type) > 0:
                return _Response(200, [("Content-Type", f"{media_type};charset=UTF-8")], text.encode("utf-8"))
        raise HttpError(406)

    def _on_options(self, call: _Call) -> _Response:
        """§3.6 the request info as a root `request` document plus `Allow`."""
        request_id = call.int_param("id")
        allow = ("Allow", "GET,PUT,DELETE,OPTIONS")
        with self._lock:
            info = self._requests.get(request_id)
            if info is None:
                return _Response(404, [allow])
            document = bx.render(bx.request_el(info, list(self._definitions.get(request_id, {})), root=True))
        return _Response(200, [("Content-Type", XML), allow], document)

    def _on_filtered(self, call: _Call) -> _Response:
        """§3.7: exact type match, namespace-unaware XPath, no `type` children in the answer."""
        media_type = call.query_param("type")
        if media_type is None or not media_type.endswith(("+xml", "/xml")):
            raise HttpError(400)
        predicate = call.query_param("predicate")
        if predicate is None:
            raise HttpError(500)
        try:
            xpath = bx.compile_predicate(predicate)
        except bx.InvalidPredicate:
            raise HttpError(400) from None
        with self._lock:
            candidates = [
                (dataclasses.replace(info), self._definitions[rid][media_type])
                for rid, info in sorted(self._requests.items())
                if media_type in self._definitions.get(rid, {})
            ]
        matches = [bx.request_el(info, []) for info, text in candidates if bx.definition_matches(xpath, text)]
        return _xml(bx.list_doc("request-list", matches))

    def _rows_of(self, request_id: int) -> list[bx.StatusRow]:
        """Status rows of a request by node id (caller holds the lock)."""
        return [row for (rid, _), row in sorted(self._status.items()) if rid == request_id]

    def _on_request_status(self, call: _Call) -> _Response:
        """§3.8 status rows; 200 with an empty list for unknown ids."""
        request_id = call.int_param("id")
        with self._lock:
            return _xml(bx.status_list_doc(self._rows_of(request_id)))

    def _on_status_message(self, call: _Call) -> _Response:
        """§3.8 a node's status message as text/plain."""
        key = (call.int_param("id"), call.int_param("node"))
        with self._lock:
            row = self._status.get(key)
            message = row.message if row is not None else None
        if message is None:
            raise HttpError(404)
        return _Response(200, [("Content-Type", TEXT)], message.encode("utf-8"))

    def _on_targets(self, call: _Call) -> _Response:
        """§3.16 target nodes of a targeted request."""
        request_id = call.int_param("id")
        with self._lock:
            info = self._requests.get(request_id)
            if info is None or not info.targeted:
                raise HttpError(404)
            return _xml(bx.target_nodes_doc(info.targets))

    def _on_set_targets(self, call: _Call) -> _Response:
        """Replace all status rows of the request by empty rows for the target nodes."""
        request_id = call.int_param("id")
        try:
            nodes = list(dict.fromkeys(bx.parse_target_nodes(call.body.read_all())))
        except ValueError:
            raise HttpError(400) from None
        if not nodes:
            raise HttpError(400)
        with self._lock:
            for key in [key for key in self._status if key[0] == request_id]:
                del self._status[key]
            for node in nodes:
                self._status[(request_id, node)] = bx.StatusRow(node)
            info = self._requests.get(request_id)
            if info is not None:
                info.targeted, info.targets = True, nodes
        return _Response(204)

    def _on_clear_targets(self, call: _Call) -> _Response:
        """§3.16 drop the targeting (status rows stay)."""
        request_id = call.int_param("id")
        with self._lock:
            info = self._requests.get(request_id)
            if info is None or not info.targeted:
                raise HttpError(404)
            info.targeted, info.targets = False, []
        return _Response(204)

    # ------------------------------------------------------------------------------------------ nodes

    def _on_my_list(self, call: _Call) -> _Response:
        """§3.9: published, open, not deleted by this node, untargeted or targeted at it."""
        node = call.node()
        items = []
        with self._lock:
            for rid, info in sorted(self._requests.items()):
                row = self._status.get((rid, node))
                hidden = row is not None and "deleted" in row.times
                if info.published is None or info.closed is not None or hidden:
                    continue
                if info.targeted and node not in info.targets:
                    continue
                own = row if row is not None and row.times else None
                items.append(bx.request_el(info, list(self._definitions.get(rid, {})), own))
            return _xml(bx.list_doc("request-list", items))

    def _on_my_definition(self, call: _Call) -> _Response:
        """§3.9 a definition for a node, not restricted to published requests."""
        request_id = call.int_param("id")
        call.node()
        return self._negotiated_definition(call, request_id)

    def _on_my_delete(self, call: _Call) -> _Response:
        """§3.11 hide a request from this node (sets `deleted`)."""
        request_id = call.int_param("id")
        node = call.node()
        with self._lock:
            row = self._status.get((request_id, node))
            if request_id not in self._requests or (row is not None and "deleted" in row.times):
                raise HttpError(404)
            self._status.setdefault((request_id, node), bx.StatusRow(node)).times["deleted"] = bx.now_millis()
        return _Response(204)

    def _on_my_status(self, call: _Call) -> _Response:
        """§3.10: upsert without any existence check; any status but `interaction` clears it."""
        request_id = call.int_param("id")
        word = call.params["status"]
        if word not in _STATUS_WORDS:
            raise HttpError(404)
        node = call.node()
        if word == "expired":
            raise HttpError(500)
        content_type = call.headers.get("Content-Type")
        message = _decode(call.body.read_all(), content_type) if content_type else None
        moment = _status_time(call.headers.get("Date"))
        with self._lock:
            row = self._status.setdefault((request_id, node), bx.StatusRow(node))
            row.times[word] = moment
            if word != "interaction":
                row.times.pop("interaction", None)
            if content_type:
                row.message_type, row.message = bx.base_type(content_type), message
        return _Response(204)

    def _on_put_result(self, call: _Call) -> _Response:
        """§3.12: streamed to a file; no existence check; replaces this node's previous result."""
        content_type = call.headers.get("Content-Type")
        if not content_type:
            raise HttpError(400)
        node = call.node()
        request_id = call.int_param("id", 500)
        fd, incoming = tempfile.mkstemp(dir=self._dir / "incoming")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(call.body.read, b""):
                    out.write(chunk)
            target = self._dir / "results" / f"{request_id}_{node}"
            with self._lock:
                os.replace(incoming, target)
                self._results[(request_id, node)] = _Result(bx.jersey_type(content_type), target, time.time())
        finally:
            Path(incoming).unlink(missing_ok=True)
        return _Response(204)

    # -------------------------------------------------------------------------- admin: results, nodes

    def _on_results(self, call: _Call) -> _Response:
        """Admin list of the uploaded results of a request."""
        request_id = call.int_param("id")
        with self._lock:
            pairs = [
                (node, result.media_type)
                for (rid, node), result in sorted(self._results.items())
                if rid == request_id
            ]
        return _xml(bx.result_list_doc(pairs))

    def _on_delete_results(self, call: _Call) -> _Response:
        """Admin removal of the uploaded results of a request."""
        request_id = call.int_param("id")
        with self._lock:
            for key in [key for key in self._results if key[0] == request_id]:
                self._results.pop(key).path.unlink(missing_ok=True)
        return _Response(204)

    def _on_result(self, call: _Call) -> _Response:
        """One uploaded result, streamed with its stored media type."""
        key = (call.int_param("id"), call.int_param("node"))
        with self._lock:
            result = self._results.get(key)
            if result is None:
                raise HttpError(404)
            stream = result.path.open("rb")
        return _file_response(stream, [("Content-Type", result.media_type)])

    def _on_nodes(self, call: _Call) -> _Response:
        """§3.13 all registered nodes (`ns2:` prefix)."""
        with self._lock:
            return _xml(bx.node_list_doc(list(self._nodes.values())))

    def _on_node(self, call: _Call) -> _Response:
        """§3.13 one node, ending with empty `modules`."""
        node_id = call.int_param("node")
        with self._lock:
            for node in self._nodes.values():
                if node.id == node_id:
                    return _xml(bx.node_el(node, root=True))
        raise HttpError(404)

    # ------------------------------------------------------------------------------- export, download

    def _on_export(self, call: _Call) -> _Response:
        """§3.14: build the bundle synchronously into `data_dir`, answer its download uuid."""
        request_id = call.int_param("id")
        with self._lock:
            info = self._requests.get(request_id)
            definitions = list(self._definitions.get(request_id, {}).items())
            if info is None or not definitions:
                raise HttpError(500)
            info = dataclasses.replace(info, targets=list(info.targets))
            rows = [dataclasses.replace(row, times=dict(row.times)) for row in self._rows_of(request_id)]
            results = [
                (node, result.media_type, result.path.open("rb"), result.modified)
                for (rid, node), result in sorted(self._results.items())
                if rid == request_id
            ]
        token = str(uuid.uuid4())
        path = self._dir / "downloads" / f"{token}.zip"
        started = time.monotonic()
        try:
            _write_bundle(path, info, definitions, rows, results)
            with self._lock:
                self.export_seconds.append(time.monotonic() - started)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            for _, _, stream, _ in results:
                stream.close()
        with self._lock:
            self._downloads[token] = _Download(
                path, request_id, time.time(), time.monotonic() + self._download_lifetime
            )
        return _Response(200, [("Content-Type", TEXT)], token.encode())

    def _on_download(self, call: _Call) -> _Response:
        """§3.15: no auth, any number of downloads until the lifetime (from creation) is over."""
        token = call.params["uuid"]
        with self._lock:
            now = time.monotonic()
            for expired in [key for key, download in self._downloads.items() if download.expires <= now]:
                self._downloads.pop(expired).path.unlink(missing_ok=True)
            download = self._downloads.get(token.lower()) if _UUID.fullmatch(token) else None
            if download is None:
                raise HttpError(404)
            stream = download.path.open("rb")
        return _file_response(
            stream,
            [
                ("Content-Type", "application/zip"),
                ("Last-Modified", formatdate(download.created, usegmt=True)),
                ("Content-Disposition", f'inline; filename="{self.download_names.get(download.request_id, f"export_{download.request_id}.zip")}"'),
            ],
        )


def _answer_hostile(handler: _Handler, fault: _Fault, stopping: threading.Event) -> None:
    """Write one of the HOSTILE_ANSWERS; the waiting ones end when the emulator stops."""
    out = handler.wfile
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n"
    opening = b'<request-list xmlns="http://aktin.org/ns/exchange">'
    numbers = iter(range(10**9))

    def elements(count: int) -> bytes:  # distinct ids, like a real listing
        return b"".join(b'<request id="%09d"><published>2024-05-02T10:15:30.123456Z</published>'
                        b"<targeted>false</targeted></request>" % next(numbers) for _ in range(count))

    element = elements(1)
    if fault.hostile == "silent":
        stopping.wait()
    elif fault.hostile in ("trickle", "trickle_headers"):
        if fault.hostile == "trickle":
            out.write(head + b"Content-Length: 1000000\r\n\r\n" + opening)
            out.flush()
            payload = elements(10000)
        else:
            payload = head + b"X-Padding: " + b"a" * 60000 + b"\r\n\r\n"
        for byte in payload:
            if stopping.wait(fault.delay):
                return
            out.write(bytes([byte]))
            out.flush()
    elif fault.hostile == "huge":
        count = max(0, (fault.size - len(opening) - 16) // len(element))
        out.write(head + b"Content-Length: %d\r\n\r\n" % (len(opening) + count * len(element) + 15) + opening)
        for _ in range(count // 1000):
            out.write(elements(1000))
        out.write(elements(count % 1000) + b"</request-list>")
    elif fault.hostile == "gzip_bomb":
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        body = compressor.compress(opening)
        filler = b"<!-- " + b"x" * (1024 * 1024) + b" -->"
        for _ in range(fault.size // len(filler)):
            body += compressor.compress(filler)
        body += compressor.compress(b"</request-list>") + compressor.flush()
        out.write(head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    elif fault.hostile == "endless":
        out.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        out.write(b"%x\r\n" % len(opening) + opening + b"\r\n")
        while not stopping.is_set():
            block = elements(1000)
            out.write(b"%x\r\n" % len(block) + block + b"\r\n")
    out.flush()


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the emulator; keep-alive capable (HTTP/1.1, Content-Length always set)."""

    protocol_version = "HTTP/1.1"
    # Jetty sets TCP_NODELAY on accepted sockets; without it a keep-alive client waits ~40 ms per
    # response (Nagle + delayed ACK) and every timing measures the emulator.
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        """Server header like the real deployment's Jetty."""
        return "Jetty(9.4.55.v20240627)"

    def log_message(self, format: str, *args: object) -> None:
        """Access log to the debug logger instead of stderr."""
        log.debug("%s " + format, self.address_string(), *args)

    def setup(self) -> None:
        context = self.server.emulator.tls_context
        if context is not None:  # the handshake runs in this connection's thread, not in the accept loop
            self.request = context.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def do_GET(self) -> None:
        """Every method is routed by the emulator (405 for unsupported ones)."""
        self.server.emulator._serve(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_GET


class _Server(ThreadingHTTPServer):
    """Threading server that remembers its open connections so `stop()` can cut idle keep-alives."""

    daemon_threads = True
    request_queue_size = 50  # the JVM's default listen backlog, as Jetty has it (socketserver's is 5)

    def __init__(self, address: tuple[str, int], emulator: BrokerEmulator):
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, is_open: bool) -> None:
        """Register or forget a client connection."""
        with self._connections_lock:
            (self._connections.add if is_open else self._connections.discard)(connection)

    def close_connections(self) -> None:
        """Shut down every open client connection."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:
        """Client connection errors are expected (truncation, stop()); keep them out of stderr."""
        log.debug("connection from %s failed: %r", client_address, sys.exc_info()[1])


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="AKTIN broker API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically)")
    parser.add_argument("--data-dir", type=Path, help="keep results and bundles here instead of a temp dir")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds added before every response (a broker across a network)")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    with BrokerEmulator(args.host, args.port, data_dir=args.data_dir, latency=args.latency, tls=tls) as emulator:
        print(f"broker emulator listening on {emulator.url}", flush=True)
        if args.port_file is not None:
            partial = args.port_file.with_name(f".{args.port_file.name}.{os.getpid()}.tmp")
            partial.write_text(f"{emulator.port}\n")
            os.replace(partial, args.port_file)
        while not stopping.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

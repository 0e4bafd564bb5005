"""The broker client's HTTP layer: deadlines, retries, body limits, the environment, against tiny real servers.

Each server here is a few lines on 127.0.0.1 that answer exactly what a test needs (raw bytes on a real
socket), where the broker emulator would need a new fault for every case.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.broker.session import BrokerSession, resolve_route
from broker_sftp_uploader.errors import BrokerError

STATUS_DOCUMENT = (b'<request-status-list xmlns="http://aktin.org/ns/exchange"><request-status-info><node>0</node>'
                   b"<completed>2024-05-02T10:16:00Z</completed></request-status-info></request-status-list>")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def answer(status: str, body: bytes = b"", *headers: str) -> bytes:
    """A whole HTTP/1.1 response."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    """Answers the n-th request it receives (counted from 0) with ``script(n, head, connection)``.

    ``script`` writes whatever it likes to the connection and returns whether to keep it open for the
    next request. ``heads`` holds every request head received, ``connections`` the number of the
    connection (counted from 0) each came on.
    """

    def __init__(self, script: Callable[[int, bytes, socket.socket], bool]):
        self.script = script
        self.heads: list[bytes] = []
        self.connections: list[int] = []
        self.stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            for number in itertools.count():
                connection, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, connection_number: int) -> None:
        with connection, contextlib.suppress(OSError):
            reader = connection.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline(65536)
                    if not line:
                        return
                    head += line
                with self._lock:
                    number = len(self.heads)
                    self.heads.append(head)
                    self.connections.append(connection_number)
                if not self.script(number, head, connection):
                    return

    def trickle(self, connection: socket.socket, data: bytes, pause: float = 0.2, limit: float = 30.0) -> None:
        """Send ``data`` one byte per ``pause`` seconds, for at most ``limit`` seconds."""
        end = time.monotonic() + limit
        for byte in data:
            if self.stopping.wait(pause) or time.monotonic() > end:
                return
            connection.sendall(bytes([byte]))

    def close(self) -> None:
        self.stopping.set()
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int, bytes, socket.socket], bool]], RawServer]]:
    servers: list[RawServer] = []

    def start(script: Callable[[int, bytes, socket.socket], bool]) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No proxy or CA bundle from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def client(url: str, **options) -> BrokerClient:
    options = {"call_timeout": 10.0, "export_timeout": 10.0, "retries": 3, "concurrency": 4,
               "sleep": lambda seconds: None, **options}
    return BrokerClient(url, "secret-api-key", **options)


def fails(call: Callable[[], object]) -> tuple[str, float]:
    """The BrokerError's message ``call`` raises, and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        call()
    return str(caught.value), time.monotonic() - start


# ---- retries ----------------------------------------------------------------------------------------

def test_retry_after_is_honoured(serve):
    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        connection.sendall(answer("503 Service Unavailable", b"", "Retry-After: 2") if number == 0
                           else answer("200 OK", STATUS_DOCUMENT))
        return True

    server, waits = serve(script), []
    with client(server.url, sleep=waits.append, call_timeout=30) as api:
        assert api.get_completion("7") == "1.0"
    assert waits == [2]
    assert len(server.heads) == 2


def test_retry_after_beyond_the_deadline_gives_up_at_once(serve):
    server, waits = serve(lambda number, head, connection: connection.sendall(
        answer("503 Service Unavailable", b"", "Retry-After: 120")) is None), []
    with client(server.url, sleep=waits.append, call_timeout=5) as api:
        message, _ = fails(lambda: api.get_completion("7"))
    assert message == "broker answered 503 to GET /broker/request/7/status"
    assert waits == [] and len(server.heads) == 1


def test_a_refused_answer_with_an_endless_body_is_retried_without_reading_it(serve):
    """urllib3 would drain a retried answer's body to reuse the connection: an endless one never ends."""

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        if number > 0:
            connection.sendall(answer("200 OK", STATUS_DOCUMENT))
            return True
        connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        while not server.stopping.is_set():
            connection.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        return False

    server = serve(script)
    with client(server.url, call_timeout=20) as api:
        assert api.get_completion("7") == "1.0"
    assert len(server.heads) == 2


def test_the_export_is_not_retried_when_the_connection_breaks(serve):
    server = serve(lambda number, head, connection: False)  # closes without answering
    with client(server.url) as api:
        message, _ = fails(lambda: api.open_result("7"))
    assert message.startswith(f"cannot reach the broker at {server.url} (")
    assert [head.split(b" ")[0] for head in server.heads] == [b"POST"]


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_without_spending_a_retry(serve):
    """The server closes the idle connection just as the next request arrives (tinyproxy always does)."""

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        if number == 1:
            return False  # the second request, on the kept-alive connection: closed without an answer
        connection.sendall(answer("200 OK", STATUS_DOCUMENT))
        return True

    server = serve(script)
    with client(server.url, retries=0) as api:
        assert api.get_completion("7") == "1.0"
        assert api.get_completion("8") == "1.0"
    assert server.connections == [0, 0, 1]


def test_calls_that_are_not_retried_get_a_connection_of_their_own(serve):
    uuid = b"0f0e0d0c-0b0a-0908-0706-050403020100"

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        connection.sendall(answer("200 OK", uuid if head.startswith(b"POST") else STATUS_DOCUMENT))
        return b"Connection: close" not in head

    server = serve(script)
    with client(server.url) as api:
        api.get_completion("7")
        for request_id in ("7", "8"):
            with api.open_result(request_id) as result:
                result.read()  # read to its end: the download's connection is kept alive
    methods = [head.split(b" ")[0].decode() for head in server.heads]
    assert list(zip(methods, server.connections)) == [("GET", 0), ("POST", 1), ("GET", 0), ("POST", 2), ("GET", 0)]


def test_a_call_that_is_not_retried_never_reuses_a_connection_the_server_has_not_closed_yet(serve):
    """A server that honours "Connection: close" a moment late (without saying so in its answer): the
    connection still looks alive when the next export starts, and a request sent into it would fail for
    nothing. Seen as a lost upload (one export in a few hundred) before every export got its own."""
    uuid = b"0f0e0d0c-0b0a-0908-0706-050403020100"
    served_an_export: set[int] = set()

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        connection_number = server.connections[number]
        if connection_number in served_an_export:
            return False  # the late close: this request is dropped unanswered
        if head.startswith(b"POST"):
            served_an_export.add(connection_number)
            connection.sendall(answer("200 OK", uuid))
        else:
            connection.sendall(answer("200 OK", STATUS_DOCUMENT))
        return True

    server = serve(script)
    with client(server.url) as api:
        for request_id in ("7", "8", "9"):
            with api.open_result(request_id) as result:
                result.read()
    posts = [connection for head, connection in zip(server.heads, server.connections) if head.startswith(b"POST")]
    assert len(posts) == 3 and len(set(posts)) == 3


def test_retries_log_one_line_each_and_no_urllib3_warning(serve, caplog):
    server = serve(lambda number, head, connection: connection.sendall(
        answer("502 Bad Gateway") if number == 0 else answer("200 OK", STATUS_DOCUMENT)) is None)
    with caplog.at_level(logging.INFO), client(server.url) as api:
        assert api.get_completion("7") == "1.0"
    assert [record.levelname for record in caplog.records] == ["INFO"]
    assert "failed (502); retrying" in caplog.records[0].getMessage()
    assert "secret-api-key" not in caplog.text


# ---- hard deadlines where a socket timeout does not help ----------------------------------------------

def test_a_proxy_trickling_its_connect_answer_is_cut_at_the_deadline(serve, monkeypatch):
    """A read timeout bounds only the wait for the next byte: the deadline must reach the tunnel set-up."""

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        server.trickle(connection, b"HTTP/1.1 200 Connection established\r\nX-Padding: " + b"a" * 1000)
        return False

    server = serve(script)
    monkeypatch.setenv("HTTPS_PROXY", server.url)
    with client("https://broker.invalid", call_timeout=2) as api:
        message, elapsed = fails(api.check_status)
    assert "did not answer HEAD /broker/status within 2 s" in message
    assert elapsed < 20  # the proxy trickles for 30 s: only the deadline ends it sooner
    assert server.heads[0].startswith(b"CONNECT broker.invalid:443 ")


def test_a_tls_handshake_that_trickles_is_cut_at_the_deadline():
    """A server that starts a TLS record and never finishes it holds no call past its deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def handshake_forever() -> None:  # a TLS record header announcing 16 KiB, then a byte now and then
        connection, _ = listener.accept()
        with connection, contextlib.suppress(OSError):
            connection.sendall(b"\x16\x03\x03\x40\x00")
            end = time.monotonic() + 30
            while not stop.wait(0.2) and time.monotonic() < end:
                connection.sendall(b"\x00")

    threading.Thread(target=handshake_forever, daemon=True).start()
    try:
        with client(f"https://127.0.0.1:{listener.getsockname()[1]}", call_timeout=2, retries=0) as api:
            message, elapsed = fails(api.check_status)
    finally:
        stop.set()
        listener.close()
    assert "did not answer HEAD /broker/status within 2 s" in message
    assert elapsed < 20


# ---- bodies -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,body", [("gzip", gzip.compress(STATUS_DOCUMENT)),
                                           ("deflate", zlib.compress(STATUS_DOCUMENT))])
def test_a_compressed_answer_is_decoded(serve, encoding, body):
    server = serve(lambda number, head, connection: connection.sendall(
        answer("200 OK", body, f"Content-Encoding: {encoding}")) is None)
    with client(server.url) as api:
        assert api.get_completion("7") == "1.0"


@pytest.mark.parametrize("encoding,body,reason", [
    ("snappy", STATUS_DOCUMENT, "unsupported Content-Encoding 'snappy'"),
    ("gzip", b"\x1f\x8b\x08\x00 this is not gzip", "corrupt compressed body"),
])
def test_an_undecodable_answer_is_refused(serve, encoding, body, reason):
    server = serve(lambda number, head, connection: connection.sendall(
        answer("200 OK", body, f"Content-Encoding: {encoding}")) is None)
    with client(server.url) as api:
        message, _ = fails(lambda: api.get_completion("7"))
    assert message == f"broker's answer to GET /broker/request/7/status is unreadable ({reason})"


def test_a_download_with_an_unknown_encoding_is_not_passed_on_as_it_came(serve):
    uuid = b"0f0e0d0c-0b0a-0908-0706-050403020100"

    def script(number: int, head: bytes, connection: socket.socket) -> bool:
        connection.sendall(answer("200 OK", uuid) if head.startswith(b"POST")
                           else answer("200 OK", b"PK\x03\x04...", "Content-Encoding: br-unknown"))
        return True

    server = serve(script)
    with client(server.url) as api, api.open_result("7") as result:
        message, _ = fails(result.read)
    assert "unsupported Content-Encoding" in message


# ---- the environment, resolved once ----------------------------------------------------------------------

def test_route_picks_the_proxy_as_requests_does(monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "http://all.example:3128")
    assert resolve_route("https://broker.example", None).proxy == "http://all.example:3128"
    assert resolve_route("https://broker.example", None).proxy_variable == "ALL_PROXY"
    monkeypatch.setenv("HTTPS_PROXY", "https://user:p%40ss@secure.example")
    route = resolve_route("https://broker.example", None)
    assert route.proxy_variable == "HTTPS_PROXY"
    assert route.proxy_shown == "https://secure.example:443"  # credentials never shown
    monkeypatch.setenv("HTTP_PROXY", "plain.example")
    assert resolve_route("http://broker.example", None).proxy_shown == "http://plain.example:80"


@pytest.mark.parametrize("no_proxy,bypassed", [("127.0.0.0/8", True), ("10.0.0.0/8", False),
                                                ("localhost,127.0.0.1", True), ("*", True)])
def test_route_honours_no_proxy_with_cidr_ranges(monkeypatch, no_proxy, bypassed):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert (resolve_route("http://127.0.0.1:8080", None).proxy is None) == bypassed


def test_route_takes_the_ca_bundle_from_the_config_then_the_environment(monkeypatch, tmp_path):
    assert resolve_route("https://broker.example", None).verify is True  # requests' own (certifi's)
    monkeypatch.setenv("CURL_CA_BUNDLE", "/curl.pem")
    assert resolve_route("https://broker.example", None).verify == "/curl.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/requests.pem")
    assert resolve_route("https://broker.example", None).verify == "/requests.pem"
    assert resolve_route("https://broker.example", tmp_path / "config.pem").verify == str(tmp_path / "config.pem")


@pytest.mark.parametrize("base", ["http://127.0.0.1:8080", "https://broker.example/aktin/"])
@pytest.mark.parametrize("method,target", [
    ("HEAD", "/broker/status"), ("GET", "/broker/request/12/status"), ("POST", "/broker/export/request-bundle/3"),
    ("GET", "/broker/request/filtered?type=application%2Fvnd.aktin.query.request%2Bxml&predicate=%2F%2Ftag%3D%27r%C3%A4%27"),
])
def test_requests_are_prepared_as_requests_prepares_them(base, method, target):
    headers = {"Authorization": "Bearer k", "User-Agent": "test", "Accept-Encoding": "identity"}
    session = BrokerSession(base, ca_bundle=None, headers=headers, retries=0, retry_backoff=0, pool_size=1)
    ours = session.prepare(method, target, "application/xml")
    theirs = requests.Request(method, base.rstrip("/") + target, headers={**headers, "Accept": "application/xml"}
                              ).prepare()
    assert (ours.method, ours.url, dict(ours.headers), ours.body) == \
        (theirs.method, theirs.url, dict(theirs.headers), theirs.body)


def test_a_missing_ca_bundle_in_the_environment_is_named(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with client("https://127.0.0.1:9") as api:
        message, _ = fails(api.check_status)
    assert str(tmp_path / "missing.pem") in message and "REQUESTS_CA_BUNDLE" in message

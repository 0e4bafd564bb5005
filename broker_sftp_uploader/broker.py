"""HTTP client for the AKTIN broker API, as described in shared/broker-api.md.

Everything the broker sends is treated as untrusted: XML is parsed with entities and network off,
request ids must be plain integers, the download uuid must look like one, and the file name from
Content-Disposition is reduced to a safe base name.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import requests
from lxml import etree
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from broker_sftp_uploader.errors import BrokerError

logger = logging.getLogger(__name__)

NAMESPACE = "http://aktin.org/ns/exchange"
QUERY_MEDIA_TYPE = "application/vnd.aktin.query.request+xml"
DOWNLOAD_CHUNK_SIZE = 64 * 1024
# (connect, read) seconds for every call. The broker builds an export bundle before it answers the
# export call, which for a multi-GiB result takes minutes, hence the generous read timeout.
DEFAULT_TIMEOUT = (10.0, 300.0)

_REQUEST_ID = re.compile(r"[0-9]{1,18}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_FILENAME = re.compile(r'filename\s*=\s*"([^"]*)"|filename\s*=\s*([^;\s]+)', re.IGNORECASE)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
RESERVED_REMOTE_NAMES = frozenset({"status.xml"})


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def default_remote_name(request_id: str) -> str:
    """The broker's naming convention for a request's export bundle."""
    return f"export_{request_id}.zip"


def safe_remote_name(content_disposition: str | None, request_id: str) -> str:
    """Given an untrusted Content-Disposition header, return a safe file name for the upload.

    Keeps only the base name (no folders, no leading dot, only letters, digits, ``._-``); anything
    else, and names reserved for our own files, fall back to ``export_<id>.zip``.
    """
    fallback = default_remote_name(request_id)
    match = _FILENAME.search(content_disposition or "")
    if not match:
        return fallback
    name = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
    name = re.split(r"[/\\]", name)[-1]
    if not _SAFE_NAME.fullmatch(name) or ".." in name or name.lower() in RESERVED_REMOTE_NAMES:
        return fallback
    return name


def format_completion(completed: int, total: int) -> str:
    """Completion as the original script wrote it: ``str(round(c / n, 2))``, ``"0.0"`` without rows."""
    return str(round(completed / total, 2) if total else 0.0)


def parse_request_ids(document: bytes) -> list[str]:
    """Return the ``id`` attribute of every request in a broker ``request-list`` document.

    :raises BrokerError: the document is not XML, not a request list, or an id is not an integer.
    """
    root = _parse(document, "request list")
    if etree.QName(root).localname != "request-list":
        raise BrokerError(f"broker sent a <{etree.QName(root).localname}> where a request-list was expected")
    ids = []
    for child in root:
        if not isinstance(child.tag, str):
            continue
        request_id = (child.get("id") or "").strip()
        if not _REQUEST_ID.fullmatch(request_id):
            raise BrokerError(f"broker sent a request with an invalid id {request_id[:40]!r}")
        ids.append(str(int(request_id)))
    return ids


def parse_completion(document: bytes) -> str:
    """Compute completion from a ``request-status-list``: rows with ``completed`` / all rows."""
    root = _parse(document, "request status")
    total = sum(1 for _ in root.iter(f"{{{NAMESPACE}}}node"))
    completed = sum(1 for _ in root.iter(f"{{{NAMESPACE}}}completed"))
    return format_completion(completed, total)


def _parse(document: bytes, what: str) -> etree._Element:
    try:
        return etree.fromstring(document, parser=_safe_parser())
    except etree.XMLSyntaxError as error:
        raise BrokerError(f"broker sent an unreadable {what} (not XML: {error})") from None


class ResultStream:
    """A request's result bundle as a readable binary stream, straight from the broker's download.

    ``read`` never returns more than asked plus one network chunk is held. At the end it checks the
    byte count against Content-Length, so a download cut short raises instead of ending quietly.

    :ivar remote_name: the safe file name for the upload.
    :ivar size: the announced size in bytes, or None if the broker did not send one.
    """

    def __init__(self, request_id: str, response: requests.Response):
        self.request_id = request_id
        self._response = response
        encoded = response.headers.get("Content-Encoding", "identity") != "identity"
        length = response.headers.get("Content-Length", "")
        self.size = int(length) if length.isdigit() and not encoded else None
        self.remote_name = safe_remote_name(response.headers.get("Content-Disposition"), request_id)
        self._chunks = response.iter_content(DOWNLOAD_CHUNK_SIZE)
        self._buffer = b""
        self._received = 0
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` bytes (all the rest if negative); ``b""`` at the end.

        :raises BrokerError: the connection broke or the download ended short of Content-Length.
        """
        while not self._ended and (size < 0 or len(self._buffer) < size):
            self._buffer += self._next_chunk()
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _next_chunk(self) -> bytes:
        try:
            chunk = next(self._chunks, b"")
        except requests.exceptions.RequestException as error:
            raise BrokerError(f"download of request {self.request_id} broke off after {self._received} "
                              f"bytes ({_reason(error)})") from None
        if not chunk:
            self._ended = True
            if self.size is not None and self._received != self.size:
                raise BrokerError(f"download of request {self.request_id} is incomplete: "
                                  f"got {self._received} of {self.size} bytes")
        self._received += len(chunk)
        return chunk

    def close(self) -> None:
        """Release the connection."""
        self._response.close()

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BrokerClient:
    """One keep-alive session to the broker's admin API.

    :param base_url: e.g. ``http://localhost:8080`` (no trailing slash).
    :param api_key: the admin API key; sent only in the Authorization header, never logged.
    :param session: an injectable ``requests.Session`` (tests); a retrying one is made otherwise.
    """

    def __init__(self, base_url: str, api_key: str, *, ca_bundle: Path | None = None,
                 session: requests.Session | None = None,
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT, retry_backoff: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or self._make_session(retry_backoff)
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        if ca_bundle is not None:
            self.session.verify = str(ca_bundle)

    @staticmethod
    def _make_session(backoff: float) -> requests.Session:
        # Only idempotent reads are retried, and only on connection trouble or gateway errors.
        retry = Retry(total=3, connect=3, read=2, status=2, backoff_factor=backoff,
                      status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET", "HEAD"}),
                      raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        return session

    def close(self) -> None:
        """Close the keep-alive connections."""
        self.session.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, accept: str, **kwargs) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self.session.request(method, url, headers={"Accept": accept},
                                            timeout=self.timeout, **kwargs)
        except requests.exceptions.SSLError as error:
            raise BrokerError(f"TLS error talking to the broker at {self.base_url}: {error.__class__.__name__}; "
                              "check the URL and REQUESTS_CA_BUNDLE") from None
        except requests.exceptions.Timeout:
            raise BrokerError(f"broker at {self.base_url} did not answer {method} {path} in time") from None
        except requests.exceptions.RequestException as error:
            raise BrokerError(f"cannot reach the broker at {self.base_url} ({_reason(error)}); "
                              "check BROKER.URL and that the broker is running") from None
        if response.status_code == 401:
            response.close()
            raise BrokerError(f"broker rejected the API key (401) for {method} {path}; "
                              "check BROKER.API_KEY is an admin key")
        if not 200 <= response.status_code < 300:
            response.close()
            raise BrokerError(f"broker answered {response.status_code} to {method} {path}")
        return response

    def check_status(self) -> None:
        """HEAD /broker/status, as the original does before anything else.

        :raises BrokerError: unreachable or not answering 200.
        """
        self._call("HEAD", "/broker/status", "application/xml")

    def list_tagged_request_ids(self, tag: str) -> list[str]:
        """Ids (as strings) of the requests whose definition carries ``<tag>tag</tag>``."""
        params = {"type": QUERY_MEDIA_TYPE, "predicate": f"//tag='{tag}'"}
        response = self._call("GET", "/broker/request/filtered", "application/xml", params=params)
        return parse_request_ids(response.content)

    def get_completion(self, request_id: str) -> str:
        """The request's completion string (``"0.0"`` … ``"1.0"``) from its status list."""
        response = self._call("GET", f"/broker/request/{request_id}/status", "application/xml")
        return parse_completion(response.content)

    def open_result(self, request_id: str) -> ResultStream:
        """Export the request's result bundle and open its download as a stream (close it after use).

        :raises BrokerError: the export or the start of the download failed.
        """
        export = self._call("POST", f"/broker/export/request-bundle/{request_id}", "text/plain")
        uuid = export.text.strip()
        if not _UUID.fullmatch(uuid):
            raise BrokerError(f"broker export of request {request_id} returned no download id")
        response = self._call("GET", f"/broker/download/{uuid}", "application/zip, */*", stream=True)
        return ResultStream(request_id, response)


def _reason(error: Exception) -> str:
    """A short cause for a requests exception, without URLs' query strings or headers."""
    text = str(error) or str(error.__context__)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "No route to host", "IncompleteRead", "Connection broken"):
        if marker in text:
            return marker.lower()
    return error.__class__.__name__

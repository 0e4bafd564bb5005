"""The broker's XML documents, parsed as they arrive: request lists and request status lists.

Each document is fed piece by piece into an lxml pull parser (hardened: ``safe_xml``) and
every element is dropped as soon as it ends, so memory stays flat whatever a (hostile) broker sends;
``MAX_LISTED_REQUESTS`` caps what a listing may hold. See docs/broker-api.md §3.7, §3.8 and §5.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from lxml import etree

from broker_sftp_uploader.errors import BrokerError
from broker_sftp_uploader.safe_xml import pull_parser

NAMESPACE = "http://aktin.org/ns/exchange"
MAX_LISTED_REQUESTS = 100_000
_REQUEST_ID = re.compile(r"[0-9]{1,18}")


def format_completion(completed: int, total: int) -> str:
    """Completion as the original script wrote it: ``str(round(c / n, 2))``, ``"0.0"`` without rows."""
    return str(round(completed / total, 2) if total else 0.0)


class RequestListParser:
    """Collects the ``id`` of every direct child of a ``request-list``, fed piece by piece."""

    what = "request list"

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self._depth = 0

    def start(self, element: etree._Element) -> None:
        self._depth += 1
        if self._depth == 1 and etree.QName(element).localname != "request-list":
            raise BrokerError(f"broker sent a <{etree.QName(element).localname}> where a request-list "
                              "was expected")
        if self._depth != 2:
            return
        request_id = (element.get("id") or "").strip()
        if not _REQUEST_ID.fullmatch(request_id):
            raise BrokerError(f"broker sent a request with an invalid id {request_id[:40]!r}")
        request_id = str(int(request_id))
        if request_id in self._seen:
            raise BrokerError(f"broker listed request {request_id} twice")
        if len(self.ids) >= MAX_LISTED_REQUESTS:
            raise BrokerError(f"broker lists more than {MAX_LISTED_REQUESTS} requests; refusing (is the "
                              "tag too broad?)")
        self._seen.add(request_id)
        self.ids.append(request_id)

    def end(self, element: etree._Element) -> None:
        self._depth -= 1


class StatusParser:
    """Counts ``node`` rows and ``completed`` marks of a ``request-status-list``, fed piece by piece."""

    what = "request status"

    def __init__(self) -> None:
        self.nodes = 0
        self.completed = 0

    def start(self, element: etree._Element) -> None:
        if element.tag == f"{{{NAMESPACE}}}node":
            self.nodes += 1
        elif element.tag == f"{{{NAMESPACE}}}completed":
            self.completed += 1

    def end(self, element: etree._Element) -> None:
        pass

    @property
    def completion(self) -> str:
        return format_completion(self.completed, self.nodes)


def feed_xml(pieces: Iterator[bytes], handler: RequestListParser | StatusParser) -> None:
    """Parse an XML document from ``pieces`` without keeping it: ``handler`` sees each element.

    Elements are discarded as soon as they end, so memory stays flat whatever the document's size.

    :raises BrokerError: the document is not well-formed XML or the handler refuses it.
    """
    parser = pull_parser(events=("start", "end"))
    try:
        for piece in pieces:
            parser.feed(piece)
            _drain(parser, handler)
        parser.close()
        _drain(parser, handler)
    except etree.XMLSyntaxError as error:
        raise BrokerError(f"broker sent an unreadable {handler.what} (not XML: {error})") from None


def _drain(parser: etree.XMLPullParser, handler: RequestListParser | StatusParser) -> None:
    for event, element in parser.read_events():
        if event == "start":
            handler.start(element)
        else:
            handler.end(element)
            element.clear(keep_tail=False)
            parent = element.getparent()
            if parent is not None:
                # drop the finished siblings too: the tree would otherwise keep every element
                while element.getprevious() is not None:
                    del parent[0]


def parse_request_ids(document: bytes) -> list[str]:
    """Return the ``id`` attribute of every request in a broker ``request-list`` document.

    :raises BrokerError: not XML, not a request list, an id that is not an integer, or listed twice.
    """
    handler = RequestListParser()
    feed_xml(iter([document]), handler)
    return handler.ids


def parse_completion(document: bytes) -> str:
    """Compute completion from a ``request-status-list``: rows with ``completed`` / all rows."""
    handler = StatusParser()
    feed_xml(iter([document]), handler)
    return handler.completion

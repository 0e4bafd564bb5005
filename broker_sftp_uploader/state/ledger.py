"""The XML state ledger (``WORKING_DIR/status.xml``) in the original script's format.

One ``<request-status>`` per request ever uploaded, with ``id``, ``completion``, ``uploaded`` and,
when they happened, ``last-update`` and ``deleted`` (UTC, ``YYYY-MM-DD HH:MM:SS``). We add one child
of our own, ``<file>``, the remote file name, which the original ignores. Unknown elements are kept
as they are, so both tools can go on using the same ledger.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lxml import etree

from broker_sftp_uploader.state.atomic import atomic_write
from broker_sftp_uploader.config import LEDGER_FILE_NAME
from broker_sftp_uploader.errors import LedgerError
from broker_sftp_uploader.safe_xml import tree_parser

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
# A remote file name we recorded: a plain base name in FOLDERNAME, never hidden, never a path.
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
LEDGER_FILE = LEDGER_FILE_NAME  # the ledger's name, locally and as its copy on the server
RESERVED_FILE_NAMES = frozenset({LEDGER_FILE})
_CONVENTIONAL_NAME = re.compile(r"export_([0-9]{1,18})\.zip")
FORMAT_VERSION = "1"


def format_timestamp(moment: datetime) -> str:
    """UTC timestamp in the ledger's format."""
    return moment.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows about one request."""

    request_id: str
    completion: str | None
    uploaded: str | None
    last_update: str | None
    deleted: str | None
    remote_name: str | None
    size: int | None = None  # bytes of the uploaded token (ours: <size>); None in older ledgers

    @property
    def is_deleted(self) -> bool:
        """True when the request's file was deleted from the SFTP server."""
        return self.deleted is not None

    @property
    def file_name(self) -> str:
        """The remote file this entry owns: the recorded ``<file>``, else the broker's ``export_<id>.zip``."""
        return self.remote_name or default_file_name(self.request_id)


def default_file_name(request_id: str) -> str:
    """The broker's name for a request's bundle, which is what we upload it as."""
    return f"export_{request_id}.zip"


def is_safe_file_name(name: str) -> bool:
    """True for a plain, visible base name that is not one of our own files."""
    return bool(_SAFE_FILE_NAME.fullmatch(name)) and ".." not in name and name.lower() not in RESERVED_FILE_NAMES


def _child_text(element: etree._Element, name: str) -> str | None:
    child = element.find(name)
    if child is None:
        return None
    return (child.text or "").strip()


def _size(text: str | None) -> int | None:
    """A recorded size, or None when missing or not a plain number (it only ever informs a check)."""
    return int(text) if text is not None and text.isdigit() and len(text) <= 15 else None


def _set_child(element: etree._Element, name: str, text: str) -> None:
    child = element.find(name)
    if child is None:
        child = etree.SubElement(element, name)
    child.text = text


class Ledger:
    """The ledger file in memory; every ``record_*`` call is followed by ``save()`` by the caller."""

    def __init__(self, path: Path, root: etree._Element):
        self.path = Path(path)
        self._root = root
        self._elements: dict[str, etree._Element] = {}
        for element in root:
            if not isinstance(element.tag, str) or element.tag != "request-status":
                continue
            request_id = _child_text(element, "id") or ""
            if not request_id.isdigit():
                raise LedgerError(f"ledger {self.path} has a request-status with an invalid id "
                                  f"{request_id[:40]!r}; fix or remove that entry")
            if request_id in self._elements:
                raise LedgerError(f"ledger {self.path} lists request {request_id} twice; "
                                  "remove one of the entries")
            self._elements[request_id] = element
        self._check_file_names()

    def _check_file_names(self) -> None:
        """Refuse ``<file>`` values that could reach outside FOLDERNAME or that two live entries share.

        The ledger may come back from the server's copy, which the receiving side can edit, so a
        name in it is as untrusted as one from the broker: it is used to delete files.
        """
        owners: dict[str, str] = {}
        for request_id, entry in self.entries().items():
            if entry.remote_name is not None and not is_safe_file_name(entry.remote_name):
                raise LedgerError(f"ledger {self.path}: request {request_id} names the file "
                                  f"{entry.remote_name[:60]!r}, which is not a plain file name in FOLDERNAME; "
                                  "fix or remove that <file> element")
            claimed = _CONVENTIONAL_NAME.fullmatch(entry.file_name)
            if claimed and str(int(claimed.group(1))) != request_id:
                raise LedgerError(f"ledger {self.path}: request {request_id} names the file {entry.file_name}, "
                                  f"which is request {int(claimed.group(1))}'s by the broker's convention; "
                                  f"set it to {default_file_name(request_id)} or remove that <file> element")
            if entry.is_deleted:
                continue
            other = owners.setdefault(entry.file_name, request_id)
            if other != request_id:
                raise LedgerError(f"ledger {self.path}: requests {other} and {request_id} both claim the "
                                  f"remote file {entry.file_name}; remove the wrong <file> element (the "
                                  "request whose id is not in the name)")

    @classmethod
    def load(cls, path: Path) -> Ledger:
        """Read the ledger at ``path``; a missing file is an empty ledger.

        :raises LedgerError: the file cannot be read or is not a ledger.
        """
        path = Path(path)
        parser = tree_parser(remove_blank_text=True)
        try:
            with open(path, "rb") as handle:
                root = etree.parse(handle, parser).getroot()
        except FileNotFoundError:
            root = etree.Element("status")
        except OSError as error:
            raise LedgerError(f"cannot read ledger {path}: {error.strerror}") from None
        except etree.XMLSyntaxError as error:
            raise LedgerError(f"ledger {path} is not valid XML ({error}); restore it from the copy "
                              "on the SFTP server or move it away to start afresh (re-uploads everything)") from None
        if root.getroottree().docinfo.doctype or root.getroottree().docinfo.internalDTD is not None:
            raise LedgerError(f"ledger {path} contains a DOCTYPE, which no ledger of ours has; remove the "
                              "<!DOCTYPE …> part (and any entity references) or restore a clean copy")
        if root.tag != "status":
            raise LedgerError(f"ledger {path} has root <{root.tag}>, expected <status>")
        root.set("version", root.get("version", FORMAT_VERSION))
        return cls(path, root)

    def entries(self) -> dict[str, LedgerEntry]:
        """Every request in the ledger by id."""
        return {request_id: LedgerEntry(
            request_id=request_id,
            completion=_child_text(element, "completion"),
            uploaded=_child_text(element, "uploaded"),
            last_update=_child_text(element, "last-update"),
            deleted=_child_text(element, "deleted"),
            remote_name=_child_text(element, "file"),
            size=_size(_child_text(element, "size")),
        ) for request_id, element in self._elements.items()}

    def record_upload(self, request_id: str, completion: str, remote_name: str, moment: datetime,
                      size: int | None = None) -> None:
        """Note that the request's result was uploaded with ``completion``.

        A new request gets ``uploaded``; a known one gets ``last-update``, and loses ``deleted`` if
        it was re-listed after a deletion.
        """
        stamp = format_timestamp(moment)
        element = self._elements.get(request_id)
        if element is None:
            element = etree.Element("request-status")
            self._insert_in_id_order(element, int(request_id))
            etree.SubElement(element, "id").text = request_id
            etree.SubElement(element, "completion").text = completion
            etree.SubElement(element, "uploaded").text = stamp
            self._elements[request_id] = element
        else:
            _set_child(element, "completion", completion)
            _set_child(element, "last-update", stamp)
            deleted = element.find("deleted")
            if deleted is not None:
                element.remove(deleted)
        _set_child(element, "file", remote_name)
        if size is not None:
            _set_child(element, "size", str(size))

    def _insert_in_id_order(self, element: etree._Element, number: int) -> None:
        """Put a new entry before the first one with a higher id: the file's order is then the same
        whatever order parallel uploads completed in."""
        for position, other in enumerate(self._root):
            if isinstance(other.tag, str) and other.tag == "request-status" and int(_child_text(other, "id")) > number:
                self._root.insert(position, element)
                return
        self._root.append(element)

    def record_deletion(self, request_id: str, moment: datetime) -> None:
        """Note that the request's file was deleted from the SFTP server."""
        _set_child(self._elements[request_id], "deleted", format_timestamp(moment))

    def to_bytes(self) -> bytes:
        """The ledger document as written to disk."""
        return etree.tostring(self._root.getroottree(), pretty_print=True, xml_declaration=True,
                              encoding="UTF-8")

    def save(self) -> None:
        """Write the ledger atomically (temp file, fsync, rename), keeping the old file's mode.

        :raises LedgerError: the file cannot be written; the previous ledger is then intact.
        """
        try:
            mode = os.stat(self.path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        try:
            with atomic_write(self.path, mode=mode) as handle:
                handle.write(self.to_bytes())
        except OSError as error:
            raise LedgerError(f"cannot save ledger {self.path}: {error.strerror or error}") from None

"""One SFTP channel's work: atomic uploads, deletes, and the removal of a killed run's partial files.

A session works on any paramiko ``SFTPClient``: a channel of the in-process SSH connection, or one
spoken over an ``ssh`` child process (see ``openssh.py``). Several sessions of one connection may work
at once, each from its own thread.

Uploads go to a hidden ``.<name>.part-<random>`` file, journaled before it exists (``state/journal.py``),
then renamed into place, so a receiver never sees a partial file under its final name. The writes are
pipelined: up to ``MAX_IN_FLIGHT`` requests of ``WRITE_SIZE`` bytes are on their way before the
oldest acknowledgement is awaited, so client and server work at the same time instead of taking turns
(paramiko's own ``SFTPFile.write`` sends 32 KiB requests and drains every acknowledgement once 100
are pending). What does not depend on an answer goes together: the close right after the last write,
with the stat of the file after it; the two checks after the rename. A small upload thus takes four
round trips (open; write, close and stat; rename; the checks), not seven. The requests that paramiko's
public API does not offer, and the exact status codes, come from ``paramiko_internals.py``.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

import paramiko

from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.sftp.paramiko_internals import (
    POSIX_RENAME,
    STATUS_FAILURE,
    STATUS_FILE_ALREADY_EXISTS,
    STATUS_OK,
    STATUS_OP_UNSUPPORTED,
    AttributesReply,
    StatusReply,
    channel_is_closed,
    connection_is_lost,
    open_new_file,
    plain_rename,
    posix_rename,
    send_close,
    send_stat,
    send_write,
    server_extensions,
    server_version,
)
from broker_sftp_uploader.state.journal import PartialsJournal

logger = logging.getLogger(__name__)

# OpenSSH's sftp-server takes messages of up to 256 KiB; a write's header needs a few dozen bytes.
WRITE_SIZE = 255 * 1024
MAX_IN_FLIGHT = 16  # writes sent and not yet acknowledged, at most: 4 MiB
READ_WINDOW = 1024 * 1024  # bytes asked for at once when a file is read back (status --verify)
# What a failed exchange raises: socket errors, timeouts and the server's refusals (OSError), protocol
# errors (SSHException), a dropped connection (EOFError).
FAILURES = (OSError, paramiko.SSHException, EOFError)


class StopSignal(Protocol):
    """What stops an upload between two writes: a ``threading.Event``, or the run's ``Cancellation``."""

    def is_set(self) -> bool: ...


class TransferStopped(Exception):
    """The run is being interrupted: a worker's upload stops between two writes."""


# How each rename method is named (``ServerTraits.rename_method``, check's "sftp folder" line).
METHOD_POSIX_RENAME = "posix-rename"
METHOD_RENAME_OVERWRITES = "rename (overwrites)"
METHOD_DELETE_THEN_RENAME = ("rename refuses to overwrite: delete+rename fallback, a receiver may "
                             "briefly see no file")


class ServerTraits:
    """What one server offers and how it renames, learnt once per connection and shared by its sessions.

    The server's VERSION reply says which extensions it offers: posix-rename@openssh.com is sent only
    when offered, as some servers close the SFTP channel on an extension they do not know. Without the
    reply (an ``SFTPClient`` that did not keep it) posix-rename is tried once, and an "operation
    unsupported" answer remembered. Whether a plain RENAME replaces an existing file is learnt from the
    first plain RENAME onto an existing name.
    """

    def __init__(self, version: int | None = None, extensions: dict[str, bytes] | None = None) -> None:
        self.lock = threading.Lock()
        self.server_software: str | None = None  # the SSH banner's software, when the connection saw it
        self.sftp_version = version
        self.extensions = extensions  # None: not known
        # True: use it; False: the server does not offer it (or answered "unsupported"); None: try it.
        self.posix_rename: bool | None = None if extensions is None else POSIX_RENAME in extensions
        self.rename_overwrites: bool | None = None  # None: no plain RENAME onto an existing name yet
        self.reopened_channels = 0  # SFTP channels that closed under us and were opened again
        self.copying_rename_seen = False  # a RENAME left its source behind (warned once)

    @classmethod
    def of(cls, client: paramiko.SFTPClient) -> ServerTraits:
        """The traits ``client``'s VERSION reply tells (nothing learnt yet)."""
        return cls(server_version(client), server_extensions(client))

    def learn_version_reply(self, client: paramiko.SFTPClient) -> None:
        """Take the version and extensions from the first channel of a connection."""
        if self.extensions is None:
            told = ServerTraits.of(client)
            self.sftp_version, self.extensions, self.posix_rename = (told.sftp_version, told.extensions,
                                                                     told.posix_rename)

    @property
    def rename_method(self) -> str | None:
        """How a file is replaced on this server (``METHOD_…``); None while not yet known."""
        if self.posix_rename:
            return METHOD_POSIX_RENAME
        if self.posix_rename is None or self.rename_overwrites is None:
            return None
        return METHOD_RENAME_OVERWRITES if self.rename_overwrites else METHOD_DELETE_THEN_RENAME


class LinkHealth:
    """Whether one connection still works, shared by all its sessions: a dead connection is dead.

    The first request that times out, or finds the SSH connection gone, marks it dead: the failing
    session's error is the run's message, ``on_dead`` ends the connection at once (a thread blocked on
    it wakes up), and every later SFTP action on it fails at once without a request. No cleanup is tried
    on a dead connection: the journal keeps the temp names for the next run, as after a kill. On a
    partition the run thus ends after one ``SFTP.TIMEOUT``, not one per remaining request.
    """

    def __init__(self, where: str, on_dead: Callable[[], None] | None = None) -> None:
        self.where = where
        self.on_dead = on_dead
        self._lock = threading.Lock()
        self.failure: str | None = None  # why the connection is dead; None while it works
        self.failed_once = False  # a request failed on it: a later loss is no loss "while idle"

    def mark_dead(self, why: str) -> bool:
        """Mark the connection dead because of ``why`` (its first failure only); end it.

        :returns: whether this call marked it (False: it was dead already).
        """
        with self._lock:
            if self.failure is not None:
                return False
            self.failure = why
        logger.warning("the connection to %s is lost (%s): the run's remaining SFTP actions fail at once, "
                       "its partial uploads are removed by the next run", self.where, why)
        if self.on_dead is not None:
            with deferred():
                self.on_dead()
        return True

    def check(self) -> None:
        """Fail at once when the connection is dead.

        :raises SftpError: it is dead, naming its first failure.
        """
        if self.failure is not None:
            raise SftpError(f"the connection to {self.where} was lost ({self.failure}); not done in this "
                            "run")


class SftpSession:
    """An open SFTP channel on the configured folder; use it from one thread at a time."""

    def __init__(self, client: paramiko.SFTPClient, folder: str, where: str, *,
                 journal: PartialsJournal | None = None, traits: ServerTraits | None = None,
                 stop: StopSignal | None = None,
                 reopen: Callable[[], paramiko.SFTPClient] | None = None,
                 health: LinkHealth | None = None):
        """``reopen`` opens another SFTP channel on the same SSH connection, for when this one is closed
        under us (None: a closed channel stays closed); ``health`` is the connection's, shared by its
        sessions."""
        self.client = client
        self.folder = folder
        self.where = where
        self.journal = journal
        self.traits = traits or ServerTraits.of(client)
        self.stop = stop
        self.write_size = WRITE_SIZE  # the pieces an upload's source is best read in
        self.reopen = reopen
        self.health = health or LinkHealth(where)
        self._fatal: BaseException | None = None  # the failure of this session that killed the connection

    def close(self) -> None:
        """Close the channel (idempotent)."""
        with deferred():
            self.client.close()

    def _remote(self, name: str) -> str:
        return posixpath.join(self.folder, name)

    def upload(self, source: BinaryIO, name: str, size: int | None = None,
               progress: Callable[[int], None] | None = None) -> int:
        """Upload ``source`` (read to its end) as ``FOLDERNAME/name``, atomically.

        Writes ``.name.part-<random>`` first, checks its size, then renames it over ``name``. An
        interrupt is raised only between SFTP requests, so the temp file can always be removed.

        ``progress`` is called with the byte count of every write (the bound on writes in flight holds
        with or without it).

        :returns: the number of bytes uploaded.
        :raises SftpError: the transfer or the rename failed; the temp file is then removed.
        :raises TransferStopped: ``stop`` was set; the temp file is then removed.
        """
        self.health.check()
        final = self._remote(name)
        temp_name = f".{name}.part-{secrets.token_hex(6)}"
        temp = self._remote(temp_name)
        try:
            if self.journal is not None:  # before the remote file exists, so a kill -9 can't hide it
                with deferred():  # an interrupt right after it still finds the name to take out again
                    self.journal.add(temp_name)
            written, stored = self._transfer(source, temp, progress)
            if stored != written or (size is not None and written != size):
                raise SftpError(f"upload of {name} to {self.where} stored {stored} of "
                                f"{written if size is None else size} bytes")
            with deferred():
                self._rename_over(temp, final)
                self._verify_rename(temp, name, written)
        except FAILURES as error:
            self._note_failure(error)
            self._reopen_if_closed(error)
            self._discard(temp_name)
            raise SftpError(f"upload of {name} to {self.where} failed: {reason(error)}") from None
        except BaseException:
            self._discard(temp_name)
            raise
        if self.journal is not None:
            self.journal.discard(temp_name)
        logger.debug("uploaded %s (%s bytes)", final, written)
        return written

    def _transfer(self, source: BinaryIO, temp: str,
                  progress: Callable[[int], None] | None = None) -> tuple[int, int | None]:
        """Copy ``source`` into a new remote file with pipelined writes, at most ``MAX_IN_FLIGHT`` of
        them unacknowledged; close the file in every outcome.

        The close goes right after the last write and the stat of ``temp`` right after the close, both
        before any of their replies is awaited: a server handles the requests on one handle in the order
        sent, and the common servers handle every request but reads and writes one after the other. A
        stat that answers another size (a server that handled it before the close was done) is asked
        again once the close is confirmed.

        :returns: the bytes written, and the size the server then holds under ``temp`` (None: no file).
        """
        sftp = self.client
        with deferred():
            handle = open_new_file(sftp, temp)
        in_flight: deque[StatusReply] = deque()
        written = 0
        closing: StatusReply | None = None
        sized: AttributesReply | None = None
        try:
            while chunk := source.read(self.write_size):
                if self.stop is not None and self.stop.is_set():
                    raise TransferStopped()
                with deferred():
                    while len(in_flight) >= MAX_IN_FLIGHT:  # the oldest must be done before another goes
                        in_flight.popleft().wait(sftp).raise_unless_ok(sftp)
                    in_flight.append(send_write(sftp, handle, written, chunk))
                    written += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            with deferred():
                closing = send_close(sftp, handle)
                sized = send_stat(sftp, temp)
                for reply in (*in_flight, closing, sized):  # replies may come in any order
                    reply.wait(sftp)
                while in_flight:
                    in_flight.popleft().raise_unless_ok(sftp)
                closing.raise_unless_ok(sftp)
                attributes = sized.attributes(sftp)
                if attributes is None or attributes.st_size != written:
                    attributes = send_stat(sftp, temp).wait(sftp).attributes(sftp)
        except BaseException as error:
            if isinstance(error, FAILURES):
                self._note_failure(error)
            if self.health.failure is not None:
                raise  # nothing more is said on a dead connection: the next run removes the temp file
            with deferred():
                try:
                    for reply in in_flight:  # the server must be done with them before the file goes
                        reply.wait(sftp)
                    closing = closing or send_close(sftp, handle)
                    closing.wait(sftp)
                    if sized is not None:  # sent with the close: its reply comes as well
                        sized.wait(sftp)
                except FAILURES:
                    pass  # the original failure is the one to report
            raise
        return written, None if attributes is None else attributes.st_size

    def remove(self, name: str, quiet: bool = False) -> bool:
        """Delete ``FOLDERNAME/name``; a file that is already gone is fine (logged unless ``quiet``).

        :returns: whether a file was there to delete.
        :raises SftpError: the server refused the deletion.
        """
        self.health.check()
        sftp = self.client
        try:
            with deferred():
                sftp.remove(self._remote(name))
        except FileNotFoundError:
            if not quiet:
                logger.info("%s was already gone from %s", name, self.where)
            return False
        except FAILURES as error:
            self._note_failure(error)
            self._reopen_if_closed(error)
            raise SftpError(f"cannot delete {name} on {self.where}: {reason(error)}") from None
        return True

    def _note_failure(self, error: BaseException) -> None:
        """After a failed request: a timeout, or an SSH connection found gone, marks the connection dead.

        :raises SftpError: it was dead already (another session's failure came first): its message.
        """
        if error is self._fatal:
            return
        self.health.failed_once = True
        self.health.check()
        ended = isinstance(error, EOFError) or channel_is_closed(self.client)
        if isinstance(error, TimeoutError) or connection_is_lost(self.client, ended):
            if self.health.mark_dead(reason(error)):
                self._fatal = error
            else:
                self.health.check()

    def _reopen_if_closed(self, error: BaseException) -> None:
        """After a failed request: if the server closed this SFTP channel while the SSH connection lives,
        open a new channel so that the session's next actions go on (counted in the traits). A dead
        connection is left alone (``health``)."""
        if self.reopen is None or self.health.failure is not None or not channel_is_closed(self.client):
            return
        try:
            with deferred():
                client = self.reopen()
        except (*FAILURES, SftpError):
            return  # the connection itself is gone: the next action reports it
        with deferred():
            self.client.close()
        self.client = client
        with self.traits.lock:
            self.traits.reopened_channels += 1
        logger.warning("the server %s closed an SFTP channel (%s); opened a new one", self.where,
                       reason(error))

    def _verify_rename(self, temp: str, name: str, written: int) -> None:
        """Check what the rename left: no ``temp``, and ``name`` holding the ``written`` bytes.

        A ``temp`` still there (a server whose RENAME copies) is removed, with a warning once per
        connection.

        :raises SftpError: ``name`` is missing or has another size.
        :raises OSError, EOFError, paramiko.SSHException: an exchange failed.
        """
        sftp = self.client
        left = send_stat(sftp, temp, follow_links=False)  # both asked at once: neither changes anything
        final = send_stat(sftp, self._remote(name))
        for reply in (left, final):
            reply.wait(sftp)
        if left.attributes(sftp) is not None:
            with self.traits.lock:
                first, self.traits.copying_rename_seen = not self.traits.copying_rename_seen, True
            if first:
                logger.warning("the server %s left the temp name behind after a RENAME (it copies instead of "
                               "moving): every upload's temp file is removed after its rename", self.where)
            sftp.remove(temp)
        attributes = final.attributes(sftp)
        stored = None if attributes is None else attributes.st_size
        if stored != written:
            found = "no file" if stored is None else f"{stored} bytes"
            raise SftpError(f"upload of {name} to {self.where} failed: after the rename the server holds "
                            f"{found} under {name}, not the {written} bytes written; the next run uploads it "
                            "again")

    # How a plain rename refuses an existing target: OpenSSH answers FAILURE, ProFTPD (like SFTP v5+)
    # FILE_ALREADY_EXISTS.
    _TARGET_EXISTS_STATUSES = (STATUS_FAILURE, STATUS_FILE_ALREADY_EXISTS)

    def _rename_over(self, temp: str, final: str) -> None:
        """Rename ``temp`` to ``final``, replacing ``final`` if it exists.

        With posix-rename@openssh.com the replacement is one atomic step. A server without it gets
        SFTP's plain rename, atomic as well when ``final`` is new or the server replaces files. Only
        when that rename is refused and ``final`` exists is ``final`` deleted and the rename repeated:
        between these two requests a receiver finds no ``final``.

        :raises OSError: the server refused, as paramiko reports it (FileNotFoundError, PermissionError,
            OSError with the server's text); ``final`` is then untouched.
        :raises SftpError: ``final`` was deleted, but the new file could not be renamed into place.
        """
        sftp = self.client
        traits = self.traits
        if traits.posix_rename is not False:  # offered, or not known (then tried once per connection)
            reply = posix_rename(sftp, temp, final)
            if reply.status != STATUS_OP_UNSUPPORTED:
                reply.raise_unless_ok(sftp)
                traits.posix_rename = True
                return
            traits.posix_rename = False
            logger.info("%s does not support posix-rename@openssh.com", self.where)
        # The first plain RENAME of a connection onto an existing name tells whether it replaces files.
        learning = traits.rename_overwrites is None and self._exists(final)
        reply = plain_rename(sftp, temp, final)
        if reply.status == STATUS_OK:
            if learning:
                traits.rename_overwrites = True
            return
        if reply.status not in self._TARGET_EXISTS_STATUSES or traits.rename_overwrites:
            # refused for a reason that deleting final cannot fix (a server that replaces files did not
            # refuse because final exists)
            reply.raise_unless_ok(sftp)
        try:
            sftp.remove(final)
        except FileNotFoundError:
            reply.raise_unless_ok(sftp)  # no final, so the rename failed for another reason: report it
        if traits.rename_overwrites is None:
            traits.rename_overwrites = False
            logger.info("%s refuses to rename onto an existing file: a file being replaced is deleted just "
                        "before its new version is renamed into place", self.where)
        try:
            sftp.rename(temp, final)
        except FAILURES as error:
            name = posixpath.basename(final)
            raise SftpError(f"upload of {name} to {self.where} failed: the previous {name} was deleted "
                            "(this server cannot replace a file in one step), but the new one could not be "
                            f"renamed into place ({reason(error)}); the next run uploads it again"
                            ) from None

    def _exists(self, path: str) -> bool:
        """Whether ``path`` exists on the server.

        :raises OSError, EOFError, paramiko.SSHException: the server refused the question or the exchange
            failed.
        """
        try:
            self.client.lstat(path)
        except FileNotFoundError:
            return False
        return True

    def list_sizes(self) -> dict[str, int]:
        """The folder's regular files, name -> size (hidden ones included).

        :raises SftpError: the folder cannot be listed.
        """
        self.health.check()
        try:
            with deferred():
                listing = self.client.listdir_attr(self.folder)
        except FAILURES as error:
            self._note_failure(error)
            raise SftpError(f"cannot list {self.folder!r} on {self.where}: {reason(error)}") from None
        return {item.filename: item.st_size or 0 for item in listing
                if item.st_mode is not None and stat.S_ISREG(item.st_mode)}

    def read_chunks(self, name: str, size: int, window: int = READ_WINDOW) -> Iterator[bytes]:
        """Yield the first ``size`` bytes of ``FOLDERNAME/name`` in order, ``window`` bytes at a time.

        Each window is asked for at once (paramiko's ``readv``: 32 KiB reads, all in flight), so the
        download is pipelined while memory stays at about one window whatever the file's size, and
        nothing past ``size`` is read (a hostile server cannot make it read forever). Every window opens
        the file anew: paramiko's readv may stop waiting for its last replies (a race in its prefetch
        bookkeeping) and keeps what comes later in the file object, which thus goes with the window.

        :raises SftpError: the file cannot be opened or read, or it ends before ``size`` bytes.
        """
        offset = 0
        while offset < size:
            length = min(window, size - offset)
            with deferred():
                data = self._read_window(name, offset, length)
            if len(data) != length:
                raise SftpError(f"{name} on {self.where} ended after {offset + len(data)} of {size} bytes")
            offset += length
            yield data

    def _read_window(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of ``FOLDERNAME/name`` from ``offset`` on, from a file opened for them.

        :raises SftpError: the file cannot be opened or read.
        """
        self.health.check()
        try:
            with self.client.open(self._remote(name), "rb") as remote:
                return b"".join(remote.readv([(offset, length)]))
        except FAILURES as error:
            self._note_failure(error)
            raise SftpError(f"cannot read {name} on {self.where}: {reason(error)}") from None

    def remove_leftover_parts(self) -> int:
        """Remove the partial uploads that the journal says an interrupted run left behind.

        Only the names in the journal are touched; each one is taken out of the journal once it is
        gone from the server, so a failure here is retried by the next run.

        :returns: how many were still on the server.
        :raises SftpError: the server refused a removal.
        """
        if self.journal is None:
            return 0
        removed = 0
        for temp_name in self.journal.leftovers():
            if self.remove(temp_name, quiet=True):
                removed += 1
                logger.warning("removed %s on %s, a partial upload left by an interrupted run",
                               self._remote(temp_name), self.where)
            self.journal.discard(temp_name)
        return removed

    def _discard(self, temp_name: str) -> None:
        """Remove an upload's temp file and take it out of the journal; on a dead connection (or when the
        removal fails) it stays in the journal for the next run."""
        if self.health.failure is not None:
            return
        try:
            with deferred():
                self.client.remove(self._remote(temp_name))
        except FileNotFoundError:
            pass
        except FAILURES as error:
            logger.warning("could not remove the partial upload %s on %s (%s); the next run removes it",
                           self._remote(temp_name), self.where, reason(error))
            return  # keep it in the journal
        if self.journal is not None:
            self.journal.discard(temp_name)


def reason(error: BaseException) -> str:
    """A short cause of an SFTP failure."""
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, EOFError) and not str(error):
        return "the connection closed"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__

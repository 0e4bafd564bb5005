"""One SFTP channel's work: atomic uploads, deletes, and the removal of a killed run's partial files.

A session works on any paramiko ``SFTPClient``: a channel of the in-process SSH connection, or one
spoken over an ``ssh`` child process (see ``openssh.py``). Several sessions of one connection may work
at once, each from its own thread.

Uploads go to a hidden ``.<name>.part-<random>`` file, journaled before it exists (``state/journal.py``),
then renamed into place, so a receiver never sees a partial file under its final name. The writes are
pipelined: up to ``MAX_IN_FLIGHT`` requests of ``WRITE_SIZE`` bytes are on their way before the
oldest acknowledgement is awaited, so client and server work at the same time instead of taking turns
(paramiko's own ``SFTPFile.write`` sends 32 KiB requests and drains every acknowledgement once 100
are pending). The requests that paramiko's public API does not offer, and the exact status codes,
come from ``paramiko_internals.py``.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

import paramiko

from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.sftp.paramiko_internals import (
    STATUS_FAILURE,
    STATUS_FILE_ALREADY_EXISTS,
    STATUS_OP_UNSUPPORTED,
    StatusReply,
    plain_rename,
    posix_rename,
    send_write,
)
from broker_sftp_uploader.state.journal import PartialsJournal

logger = logging.getLogger(__name__)

# OpenSSH's sftp-server takes messages of up to 256 KiB; a write's header needs a few dozen bytes.
WRITE_SIZE = 255 * 1024
MAX_IN_FLIGHT = 16  # writes sent and not yet acknowledged, at most: 4 MiB
# What a failed exchange raises: socket errors, timeouts and the server's refusals (OSError), protocol
# errors (SSHException), a dropped connection (EOFError).
FAILURES = (OSError, paramiko.SSHException, EOFError)


class TransferStopped(Exception):
    """The run is being interrupted: a worker's upload stops between two writes."""


class ServerTraits:
    """What one server does not support, learnt once per connection and shared by its sessions."""

    def __init__(self) -> None:
        # Set once the server answered posix-rename@openssh.com with "operation unsupported": every
        # session then replaces files without it instead of asking again for every upload.
        self.posix_rename_unsupported = False


class SftpSession:
    """An open SFTP channel on the configured folder; use it from one thread at a time."""

    def __init__(self, client: paramiko.SFTPClient, folder: str, where: str, *,
                 journal: PartialsJournal | None = None, traits: ServerTraits | None = None,
                 stop: threading.Event | None = None):
        self.client = client
        self.folder = folder
        self.where = where
        self.journal = journal
        self.traits = traits or ServerTraits()
        self.stop = stop

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
        final = self._remote(name)
        temp_name = f".{name}.part-{secrets.token_hex(6)}"
        temp = self._remote(temp_name)
        if self.journal is not None:  # before the remote file exists, so a kill -9 can't hide it
            self.journal.add(temp_name)
        try:
            written = self._transfer(source, temp, progress)
            with deferred():
                stored = self.client.stat(temp).st_size
            if stored != written or (size is not None and written != size):
                raise SftpError(f"upload of {name} to {self.where} stored {stored} of "
                                f"{written if size is None else size} bytes")
            with deferred():
                self._rename_over(temp, final)
        except FAILURES as error:
            self._discard(temp_name)
            raise SftpError(f"upload of {name} to {self.where} failed: {reason(error)}") from None
        except BaseException:
            self._discard(temp_name)
            raise
        if self.journal is not None:
            self.journal.discard(temp_name)
        logger.debug("uploaded %s (%s bytes)", final, written)
        return written

    def _transfer(self, source: BinaryIO, temp: str, progress: Callable[[int], None] | None = None) -> int:
        """Copy ``source`` into a new remote file with pipelined writes, at most ``MAX_IN_FLIGHT`` of
        them unacknowledged; close the file in every outcome."""
        sftp = self.client
        with deferred():
            remote = sftp.open(temp, "wb")
        in_flight: deque[StatusReply] = deque()
        written = 0
        try:
            while chunk := source.read(WRITE_SIZE):
                if self.stop is not None and self.stop.is_set():
                    raise TransferStopped()
                with deferred():
                    while len(in_flight) >= MAX_IN_FLIGHT:  # the oldest must be done before another goes
                        in_flight.popleft().wait(sftp).raise_unless_ok(sftp)
                    in_flight.append(send_write(sftp, remote, written, chunk))
                    written += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            with deferred():
                while in_flight:
                    in_flight.popleft().wait(sftp).raise_unless_ok(sftp)
        except BaseException:
            with deferred():
                try:
                    for reply in in_flight:  # the server must be done with them before the file goes
                        reply.wait(sftp)
                    remote.close()
                except FAILURES:
                    pass  # the original failure is the one to report
            raise
        with deferred():
            remote.close()
        return written

    def remove(self, name: str, quiet: bool = False) -> bool:
        """Delete ``FOLDERNAME/name``; a file that is already gone is fine (logged unless ``quiet``).

        :returns: whether a file was there to delete.
        :raises SftpError: the server refused the deletion.
        """
        sftp = self.client
        try:
            with deferred():
                sftp.remove(self._remote(name))
        except FileNotFoundError:
            if not quiet:
                logger.info("%s was already gone from %s", name, self.where)
            return False
        except FAILURES as error:
            raise SftpError(f"cannot delete {name} on {self.where}: {reason(error)}") from None
        return True

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
        if not self.traits.posix_rename_unsupported:
            reply = posix_rename(sftp, temp, final)
            if reply.status != STATUS_OP_UNSUPPORTED:
                reply.raise_unless_ok(sftp)
                return
            self.traits.posix_rename_unsupported = True
            logger.info("%s does not support posix-rename@openssh.com: a file being replaced is deleted just "
                        "before its new version is renamed into place", self.where)
        reply = plain_rename(sftp, temp, final)
        if reply.status not in self._TARGET_EXISTS_STATUSES:
            reply.raise_unless_ok(sftp)  # done, or refused for a reason that deleting final cannot fix
            return
        try:
            sftp.remove(final)
        except FileNotFoundError:
            reply.raise_unless_ok(sftp)  # no final, so the rename failed for another reason: report it
        try:
            sftp.rename(temp, final)
        except FAILURES as error:
            name = posixpath.basename(final)
            raise SftpError(f"upload of {name} to {self.where} failed: the previous {name} was deleted "
                            "(this server cannot replace a file in one step), but the new one could not be "
                            f"renamed into place ({reason(error)}); the next run uploads it again"
                            ) from None

    def list_sizes(self) -> dict[str, int]:
        """The folder's regular files, name -> size (hidden ones included).

        :raises SftpError: the folder cannot be listed.
        """
        try:
            with deferred():
                listing = self.client.listdir_attr(self.folder)
        except FAILURES as error:
            raise SftpError(f"cannot list {self.folder!r} on {self.where}: {reason(error)}") from None
        return {item.filename: item.st_size or 0 for item in listing
                if item.st_mode is not None and stat.S_ISREG(item.st_mode)}

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
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__

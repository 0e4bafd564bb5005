"""One SFTP connection per run (paramiko): atomic uploads and tolerant deletes.

Host keys follow OpenSSH's ``accept-new``: the first contact records the server's key in a
known_hosts file, and from then on any other key is refused. Login is by password, private key or
both (see ``ssh_keys``). Connection-level failures are retried with backoff. Uploads go to a hidden
temp name and are renamed into place, so a receiver never sees a partial file under its final name.
"""

from __future__ import annotations

import errno
import logging
import posixpath
import random
import secrets
import socket
import time
from collections.abc import Callable
from typing import BinaryIO

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.journal import PartialsJournal
from broker_sftp_uploader.ssh_keys import KnownHosts, Login, fingerprint, load_known_hosts, load_private_key

logger = logging.getLogger(__name__)

CHUNK_SIZE = 32768  # paramiko's largest SFTP write request
# What a failed exchange raises: socket errors, timeouts and the server's refusals (OSError), protocol
# errors (SSHException), a dropped connection (EOFError).
_FAILURES = (OSError, paramiko.SSHException, EOFError)
# Backoff between connect attempts: doubling from 1 s up to 30 s, each delay jittered to 50-100 %.
RETRY_FIRST_DELAY = 1.0
RETRY_MAX_DELAY = 30.0


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key in the known_hosts file (atomically, other lines kept) and accept it."""

    def __init__(self, known_hosts: KnownHosts):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known_hosts.check_not_revoked(hostname, key)
        self.known_hosts.record(hostname, key)
        logger.warning("first connection to %s: recorded its %s host key (%s) in %s",
                       hostname, key.get_name(), fingerprint(key), self.known_hosts.path)


class _ConnectFailure(SftpError):
    """A connection-level failure (refused, reset, unreachable, timed out, no banner): worth a retry."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SftpConnection:
    """An open SFTP session on the configured server and folder; use as a context manager."""

    def __init__(self, settings: SftpSettings, journal: PartialsJournal | None = None,
                 deadline: float | None = None):
        """Load the private key at once (a bad key stops a run before it does anything).

        :raises KeyFileError: ``SFTP.PRIVATE_KEY`` is missing, unreadable, not a key, or its passphrase
            is missing or wrong.
        """
        self.settings = settings
        self.journal = journal
        self.deadline = deadline
        self._key = None
        if settings.private_key is not None:
            self._key = load_private_key(settings.private_key, settings.private_key_passphrase)
        self.folder = settings.folder
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def where(self) -> str:
        return f"{self.settings.username}@{self.settings.host}:{self.settings.port}"

    def connect(self, deadline: float | None = None, *,
                sleep: Callable[[float], None] = time.sleep) -> SftpConnection:
        """Connect, log in (password, key or both) and check the remote folder exists.

        Connection-level failures are retried ``SFTP.RETRIES`` times with exponential backoff and
        jitter (``sleep`` waits; tests pass their own), never past ``deadline`` (a ``time.monotonic()``
        value; None: no limit). A refused login, a host key or key file problem is never retried.

        :raises SftpError: unreachable, known_hosts unusable, host key changed, login refused, folder
            missing, or no time left before ``deadline``.
        """
        settings = self.settings
        key = self._key
        attempts = settings.retries + 1
        for attempt in range(1, attempts + 1):
            timeout = settings.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SftpError(f"no time left to connect to SFTP server {settings.host}:{settings.port} "
                                    "within the run's time limit (MISC.RUN_TIMEOUT)")
                timeout = min(timeout, left)
            try:
                with deferred():
                    self._open(key, timeout)
                break
            except _ConnectFailure as failure:
                delay = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: runs that failed together retry apart
                out_of_time = deadline is not None and time.monotonic() + delay >= deadline
                if attempt == attempts or out_of_time:
                    tries = f" ({attempt} attempts)" if attempt > 1 else ""
                    raise SftpError(f"cannot connect to SFTP server {settings.host}:{settings.port}: "
                                    f"{failure.reason}{tries}; check SFTP.HOST and SFTP.PORT") from None
                logger.info("cannot connect to %s (%s); attempt %d of %d in %.1f s", self.where,
                            failure.reason, attempt + 1, attempts, delay)
                sleep(delay)
        logger.info("connected to %s", self.where)
        return self

    def _open(self, key: paramiko.PKey | None, timeout: float) -> None:
        """Connect once with ``timeout``, log in and open the SFTP session on the folder.

        :raises _ConnectFailure: a connection-level failure that another attempt may not meet.
        :raises SftpError: known_hosts unusable, host key changed or revoked, login refused, folder missing.
        """
        settings = self.settings
        server = f"{settings.host}:{settings.port}"
        client = paramiko.SSHClient()
        try:
            # Read for every attempt: an earlier attempt may have recorded the key meanwhile.
            known_hosts = load_known_hosts(settings.known_hosts, client.get_host_keys())
            client.set_missing_host_key_policy(_AcceptNewPolicy(known_hosts))
            login = Login(server, settings.username, settings.password, key, settings.private_key,
                          known_hosts)
            client.connect(settings.host, port=settings.port, username=settings.username, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                           allow_agent=False, look_for_keys=False, auth_strategy=login)
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(settings.timeout)
        except paramiko.BadHostKeyException as error:
            client.close()
            presented = f"{error.key.get_name()} {fingerprint(error.key)}"
            recorded = fingerprint(error.expected_key)
            raise SftpError(f"the host key of {server} ({presented}) does not match the one recorded in "
                            f"{settings.known_hosts} ({recorded}); if the server's key really changed, "
                            "confirm the new fingerprint with its admin and replace its line there") from None
        except _FAILURES as error:
            client.close()
            # paramiko bundles the refusals of all the host's addresses; the first one says it.
            bundled = getattr(error, "errors", None)
            reason = _reason(next(iter(bundled.values())) if bundled else error)
            if _is_transient(error):
                raise _ConnectFailure(reason) from None
            raise SftpError(f"cannot connect to SFTP server {server}: {reason}; check SFTP.HOST and "
                            "SFTP.PORT") from None
        except BaseException:
            client.close()
            raise
        self._client, self._sftp = client, sftp
        try:
            sftp.stat(self.folder)
        except OSError as error:
            self.close()
            raise SftpError(f"remote folder {self.folder!r} is not usable on {self.where} "
                            f"({_reason(error)}); create it or fix SFTP.FOLDERNAME") from None

    def close(self) -> None:
        """Close the session (idempotent)."""
        with deferred():
            if self._sftp is not None:
                self._sftp.close()
            if self._client is not None:
                self._client.close()
            self._sftp = self._client = None

    def __enter__(self) -> SftpConnection:
        return self.connect(self.deadline)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remote(self, name: str) -> str:
        return posixpath.join(self.folder, name)

    def upload(self, source: BinaryIO, name: str, size: int | None = None) -> int:
        """Upload ``source`` (read to its end) as ``FOLDERNAME/name``, atomically.

        Writes ``.name.part-<random>`` first, checks its size, then renames it over ``name``. An
        interrupt is raised only between SFTP requests, so the temp file can always be removed.

        :returns: the number of bytes uploaded.
        :raises SftpError: the transfer or the rename failed; the temp file is then removed.
        """
        sftp = self._session()
        final = self._remote(name)
        temp_name = f".{name}.part-{secrets.token_hex(6)}"
        temp = self._remote(temp_name)
        if self.journal is not None:  # before the remote file exists, so a kill -9 can't hide it
            self.journal.add(temp_name)
        try:
            written = self._transfer(sftp, source, temp)
            with deferred():
                stored = sftp.stat(temp).st_size
            if stored != written or (size is not None and written != size):
                raise SftpError(f"upload of {name} to {self.where} stored {stored} of "
                                f"{written if size is None else size} bytes")
            with deferred():
                self._rename_over(temp, final)
        except _FAILURES as error:
            self._discard(temp_name)
            raise SftpError(f"upload of {name} to {self.where} failed: {_reason(error)}") from None
        except BaseException:
            self._discard(temp_name)
            raise
        if self.journal is not None:
            self.journal.discard(temp_name)
        logger.debug("uploaded %s (%s bytes)", final, written)
        return written

    @staticmethod
    def _transfer(sftp: paramiko.SFTPClient, source: BinaryIO, temp: str) -> int:
        """Copy ``source`` into a new remote file with pipelined writes; close it in every outcome."""
        with deferred():
            remote = sftp.open(temp, "wb")
            remote.set_pipelined(True)
        written = 0
        try:
            while chunk := source.read(CHUNK_SIZE):
                with deferred():
                    remote.write(chunk)
                written += len(chunk)
        except BaseException:
            with deferred():
                try:
                    remote.close()
                except _FAILURES:
                    pass  # the original failure is the one to report
            raise
        with deferred():
            remote.close()  # waits for the server to acknowledge every write
        return written

    def remove(self, name: str, quiet: bool = False) -> bool:
        """Delete ``FOLDERNAME/name``; a file that is already gone is fine (logged unless ``quiet``).

        :returns: whether a file was there to delete.
        :raises SftpError: the server refused the deletion.
        """
        sftp = self._session()
        try:
            with deferred():
                sftp.remove(self._remote(name))
        except FileNotFoundError:
            if not quiet:
                logger.info("%s was already gone from %s", name, self.where)
            return False
        except _FAILURES as error:
            raise SftpError(f"cannot delete {name} on {self.where}: {_reason(error)}") from None
        return True

    def _session(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            raise SftpError(f"not connected to {self.where}")
        return self._sftp

    # Set once the server answered posix-rename@openssh.com with "operation unsupported": the rest of
    # the session then replaces files without it instead of asking again for every upload.
    _posix_rename_unsupported = False
    # How a plain rename refuses an existing target: OpenSSH answers FAILURE, ProFTPD (like SFTP v5+)
    # FILE_ALREADY_EXISTS (11, which paramiko does not name).
    _TARGET_EXISTS_STATUSES = (paramiko.sftp.SFTP_FAILURE, 11)

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
        sftp = self._session()
        if not self._posix_rename_unsupported:
            reply = self._StatusReply.request(sftp, paramiko.sftp.CMD_EXTENDED, "posix-rename@openssh.com",
                                              temp, final)
            if reply.status != paramiko.sftp.SFTP_OP_UNSUPPORTED:
                reply.raise_unless_ok(sftp)
                return
            self._posix_rename_unsupported = True
            logger.info("%s does not support posix-rename@openssh.com: a file being replaced is deleted just "
                        "before its new version is renamed into place", self.where)
        reply = self._StatusReply.request(sftp, paramiko.sftp.CMD_RENAME, temp, final)
        if reply.status not in self._TARGET_EXISTS_STATUSES:
            reply.raise_unless_ok(sftp)  # done, or refused for a reason that deleting final cannot fix
            return
        try:
            sftp.remove(final)
        except FileNotFoundError:
            reply.raise_unless_ok(sftp)  # no final, so the rename failed for another reason: report it
        try:
            sftp.rename(temp, final)
        except _FAILURES as error:
            name = posixpath.basename(final)
            raise SftpError(f"upload of {name} to {self.where} failed: the previous {name} was deleted "
                            "(this server cannot replace a file in one step), but the new one could not be "
                            f"renamed into place ({_reason(error)}); the next run uploads it again"
                            ) from None

    class _StatusReply:
        """The status a server answers to one SFTP request, with its code.

        paramiko's exceptions keep only the server's text, which differs between servers for the same
        status ("Operation unsupported" from OpenSSH, "Unsupported operation" from ProFTPD). So the
        request goes through paramiko's reply hook (``_async_request`` / ``_async_response``, as its
        own SFTPFile uses), which hands over the raw status packet.
        """

        def __init__(self) -> None:
            self.packet: bytes | None = None

        @classmethod
        def request(cls, sftp: paramiko.SFTPClient, kind: int, *args: object) -> SftpConnection._StatusReply:
            """Send one request and wait for its status; socket and protocol failures raise."""
            reply = cls()
            sftp._async_request(reply, kind, *args)
            while reply.packet is None:
                sftp._read_response()  # hands each reply to the object that waits for it
            return reply

        def _async_response(self, kind: int, message: paramiko.Message, number: int) -> None:
            if kind != paramiko.sftp.CMD_STATUS:
                raise paramiko.SSHException(f"expected an SFTP status reply, got packet type {kind}")
            self.packet = message.get_remainder()

        @property
        def status(self) -> int:
            return paramiko.Message(self.packet).get_int()

        def raise_unless_ok(self, sftp: paramiko.SFTPClient) -> None:
            """Raise what paramiko raises for this status; nothing for OK."""
            sftp._convert_status(paramiko.Message(self.packet))

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
                if self._sftp is not None:
                    self._sftp.remove(self._remote(temp_name))
        except FileNotFoundError:
            pass
        except _FAILURES as error:
            logger.warning("could not remove the partial upload %s on %s (%s); the next run removes it",
                           self._remote(temp_name), self.where, _reason(error))
            return  # keep it in the journal
        if self.journal is not None:
            self.journal.discard(temp_name)


def _is_transient(error: BaseException) -> bool:
    """Tell whether a failed connect may succeed on another attempt: refused, reset, unreachable, timed
    out, or no SSH banner (a server restarting or over its MaxStartups). Never a refused login or an
    unresolvable name."""
    if isinstance(error, socket.gaierror):
        return error.errno == socket.EAI_AGAIN  # the resolver is down for now
    if isinstance(error, (ConnectionError, TimeoutError, EOFError, NoValidConnectionsError)):
        return True
    if isinstance(error, OSError):
        return error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT)
    # paramiko's wrapper around a banner that never came or a connection dropped during key exchange
    text = str(error)
    return type(error) is paramiko.SSHException and ("banner" in text or "Negotiation failed" in text)


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__

"""One SFTP connection per run (paramiko): atomic uploads and tolerant deletes.

Host keys follow OpenSSH's ``accept-new``: the first contact records the server's key in a
known_hosts file, and from then on any other key is refused. Uploads go to a hidden temp name and
are renamed into place, so a receiver never sees a partial file under its final name.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import socket
import time
from pathlib import Path
from typing import BinaryIO

import paramiko

from broker_sftp_uploader.atomic import atomic_write
from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred

logger = logging.getLogger(__name__)

CHUNK_SIZE = 32768  # paramiko's largest SFTP write request
# Partial uploads are hidden as ".<name>.part-<12 hex>"; one untouched for a day was left by a killed run.
_PART_NAME = re.compile(r"\..+\.part-[0-9a-f]{12}")
STALE_PART_AGE = 24 * 3600
# What a failed exchange raises: socket errors, timeouts and the server's refusals (OSError), protocol
# errors (SSHException), a dropped connection (EOFError).
_FAILURES = (OSError, paramiko.SSHException, EOFError)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key in the known_hosts file (atomically) and accept it."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        host_keys = client.get_host_keys()
        host_keys.add(hostname, key.get_name(), key)
        lines = [f"{host} {keytype} {host_key.get_base64()}\n"
                 for host, keys in host_keys.items() for keytype, host_key in keys.items()]
        with atomic_write(self.known_hosts, mode=0o644) as handle:
            handle.write("".join(lines).encode("ascii"))
        logger.warning("first connection to %s: recorded its %s host key (SHA256:%s) in %s",
                       hostname, key.get_name(), key.fingerprint.split(":", 1)[-1], self.known_hosts)


class SftpConnection:
    """An open SFTP session on the configured server and folder; use as a context manager."""

    def __init__(self, settings: SftpSettings):
        self.settings = settings
        self.folder = settings.folder
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def where(self) -> str:
        return f"{self.settings.username}@{self.settings.host}:{self.settings.port}"

    def connect(self) -> SftpConnection:
        """Connect, log in with the password and check the remote folder exists.

        :raises SftpError: unreachable, host key changed, login refused, or folder missing.
        """
        with deferred():
            self._open()
        logger.info("connected to %s", self.where)
        self._remove_stale_parts()
        return self

    def _open(self) -> None:
        settings = self.settings
        client = paramiko.SSHClient()
        try:
            if settings.known_hosts.exists():
                client.load_host_keys(str(settings.known_hosts))
            client.set_missing_host_key_policy(_AcceptNewPolicy(settings.known_hosts))
            client.connect(settings.host, port=settings.port, username=settings.username,
                           password=settings.password, timeout=settings.timeout,
                           banner_timeout=settings.timeout, auth_timeout=settings.timeout,
                           channel_timeout=settings.timeout, allow_agent=False, look_for_keys=False)
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(settings.timeout)
        except paramiko.BadHostKeyException:
            client.close()
            raise SftpError(f"the host key of {settings.host}:{settings.port} does not match the one recorded "
                            f"in {settings.known_hosts}; if the server's key really changed, remove its "
                            "line there") from None
        except paramiko.AuthenticationException:
            client.close()
            raise SftpError(f"SFTP login as {self.where} was refused; check SFTP.USERNAME and "
                            "SFTP.PASSWORD") from None
        except _FAILURES as error:
            client.close()
            raise SftpError(f"cannot connect to SFTP server {settings.host}:{settings.port}: "
                            f"{_reason(error)}; check SFTP.HOST and SFTP.PORT") from None
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
        return self.connect()

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
        temp = self._remote(f".{name}.part-{secrets.token_hex(6)}")
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
            self._discard(temp)
            raise SftpError(f"upload of {name} to {self.where} failed: {_reason(error)}") from None
        except BaseException:
            self._discard(temp)
            raise
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

    def remove(self, name: str) -> bool:
        """Delete ``FOLDERNAME/name``; a file that is already gone is fine.

        :returns: whether a file was there to delete.
        :raises SftpError: the server refused the deletion.
        """
        sftp = self._session()
        try:
            with deferred():
                sftp.remove(self._remote(name))
        except FileNotFoundError:
            logger.info("%s was already gone from %s", name, self.where)
            return False
        except _FAILURES as error:
            raise SftpError(f"cannot delete {name} on {self.where}: {_reason(error)}") from None
        return True

    def _session(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            raise SftpError(f"not connected to {self.where}")
        return self._sftp

    def _rename_over(self, temp: str, final: str) -> None:
        sftp = self._session()
        try:
            sftp.posix_rename(temp, final)
        except (FileNotFoundError, PermissionError):
            raise
        except OSError:
            # Server without posix-rename@openssh.com: plain rename refuses an existing target.
            try:
                sftp.remove(final)
            except FileNotFoundError:
                pass
            sftp.rename(temp, final)

    def _remove_stale_parts(self) -> None:
        """Remove partial uploads that a killed run left behind: ours by name, untouched for a day."""
        sftp = self._session()
        cutoff = time.time() - STALE_PART_AGE
        try:
            with deferred():
                for entry in sftp.listdir_attr(self.folder):
                    if _PART_NAME.fullmatch(entry.filename) and (entry.st_mtime or 0) < cutoff:
                        sftp.remove(self._remote(entry.filename))
                        logger.info("removed %s, a partial upload left by an earlier run",
                                    self._remote(entry.filename))
        except _FAILURES as error:
            logger.warning("could not clear old partial uploads in %s on %s: %s", self.folder, self.where,
                           _reason(error))

    def _discard(self, temp: str) -> None:
        try:
            with deferred():
                if self._sftp is not None:
                    self._sftp.remove(temp)
        except FileNotFoundError:
            pass
        except _FAILURES as error:
            logger.warning("could not remove the partial upload %s on %s (%s); the next run removes it "
                           "once it is a day old, or delete it by hand", temp, self.where, _reason(error))


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__

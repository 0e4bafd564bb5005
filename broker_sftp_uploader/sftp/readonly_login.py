"""A login to the SFTP server that records nothing: for ``check`` and ``status --remote``.

It logs in as a sync would, but against a temporary copy of known_hosts, so that a new host key is
only reported (``SftpVisit.new_host_keys``), never recorded; and it opens nothing in FOLDERNAME.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.pkey import UnknownKeyType

from broker_sftp_uploader.config import Config, SftpSettings
from broker_sftp_uploader.errors import UploaderError
from broker_sftp_uploader.sftp.connection import SftpConnection
from broker_sftp_uploader.sftp.session import SftpSession
from broker_sftp_uploader.sftp.ssh_keys import known_hosts_bytes, ssh_fingerprint
from broker_sftp_uploader.sftp.transport import sftp_connection

# What connecting logs when it records a new host key; here it records into a temporary copy that is
# thrown away, so that line would say the opposite of what happened.
_RECORDED_MESSAGE = "first connection to"


@dataclass
class SftpVisit:
    """A login made by ``sftp_without_recording``: the connection, or the error that stopped it."""

    settings: SftpSettings  # the configured ones
    connection: SftpConnection | None
    error: UploaderError | None
    new_host_keys: tuple[str, ...]  # "TYPE SHA256:…" the server presented and known_hosts lacks

    def folder_session(self) -> SftpSession:
        """An ``SftpSession`` on FOLDERNAME over the main channel (closed with the connection)."""
        if self.connection is None:
            raise self.error or UploaderError("not connected")
        main = self.connection.main
        return SftpSession(main.client, self.settings.folder, self.connection.where)

    def open_folder_session(self) -> SftpSession:
        """Another session (SFTP channel) on FOLDERNAME, for a worker thread; close it after use.

        :raises SftpError: the server refused another channel.
        """
        if self.connection is None:
            raise self.error or UploaderError("not connected")
        session = self.connection.open_session()
        session.folder = self.settings.folder  # the visit logged in without opening FOLDERNAME
        return session


@contextlib.contextmanager
def sftp_without_recording(config: Config, deadline: float) -> Iterator[SftpVisit]:
    """Log in as a sync would, against a temporary copy of known_hosts, and close again on exit.

    A new host key is accepted into the copy only, so it shows up in ``new_host_keys`` and the real
    known_hosts stays as it was. FOLDERNAME is not opened (the caller looks at it), and a failed
    connect is not retried (a check should answer at once). Connect failures are in ``error``.

    :raises KeyFileError: ``SFTP.PRIVATE_KEY`` cannot be used.
    """
    real = config.sftp
    folder = Path(tempfile.mkdtemp(prefix="bsu-check-"))  # mode 0700
    quiet = _DropRecordedMessage()
    try:
        copy = folder / "known_hosts"
        before = known_hosts_bytes(real.known_hosts)
        if before is not None:
            copy.write_bytes(before)
        settings = dataclasses.replace(real, known_hosts=copy, folder=".", retries=0)
        connection = sftp_connection(dataclasses.replace(config, sftp=settings), None, deadline)
        error = None
        for name in ("broker_sftp_uploader.sftp.connection", "broker_sftp_uploader.sftp.openssh"):
            logging.getLogger(name).addFilter(quiet)
        try:
            connection.connect(deadline)
        except UploaderError as failure:
            # It names the file it read: the copy. The operator must see (and fix) the real one.
            failure.message = failure.message.replace(str(copy), str(real.known_hosts))
            failure.args = (failure.message,)
            error = failure
        finally:
            for name in ("broker_sftp_uploader.sftp.connection", "broker_sftp_uploader.sftp.openssh"):
                logging.getLogger(name).removeFilter(quiet)
        added = _added_keys(before, known_hosts_bytes(copy))
        visit = SftpVisit(real, None if error else connection, error, added)
        try:
            yield visit
        finally:
            connection.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _DropRecordedMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RECORDED_MESSAGE)


def _added_keys(before: bytes | None, after: bytes | None) -> tuple[str, ...]:
    """``TYPE SHA256:…`` of each key line in ``after`` that ``before`` did not have."""
    old = set((before or b"").splitlines())
    added = []
    for line in (after or b"").splitlines():
        fields = line.split()
        if line in old or len(fields) < 3:
            continue
        try:
            key = paramiko.PKey.from_type_string(fields[1].decode("ascii"), base64.b64decode(fields[2]))
        except (UnicodeDecodeError, binascii.Error, ValueError, UnknownKeyType, paramiko.SSHException):
            continue
        added.append(f"{key.get_name()} {ssh_fingerprint(key)}")
    return tuple(added)

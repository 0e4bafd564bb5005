"""Every use of paramiko's private API, in this one module: pipelined writes, exact status codes, SFTP
over an ``ssh`` child's pipes.

paramiko's public ``SFTPClient`` lacks four things the uploads need. It forgets which extensions the
server offered (``posix-rename@openssh.com`` must be sent only to a server that offers it: some answer
an unknown extended request by closing the SFTP channel). Its exceptions keep only the
server's text, which differs between servers for one status ("Operation unsupported" from OpenSSH,
"Unsupported operation" from ProFTPD), so the status code itself is needed to tell an unsupported
extension or an existing target from other refusals. ``SFTPFile.write`` sends 32 KiB requests and
drains every acknowledgement once 100 are pending, where the uploads keep a steady number of large
writes in flight. And every public call waits for its reply before the next request goes, where an
upload sends what does not depend on an answer together (the close after the last write with the
stat after it; the two checks after a rename), one round trip instead of several. These come from the
reply hook that paramiko's own ``SFTPFile`` uses:

* ``SFTPClient._async_request(reply, kind, *args)`` sends a request and files ``reply`` under its number;
* ``SFTPClient._read_response()`` reads one reply and hands it to the object filed for its number, as
  ``reply._async_response(kind, message, number)``;
* ``SFTPClient._convert_status(message)`` raises what paramiko raises for a status;
* a WRITE is framed by ``send_write`` itself (paramiko's framing copies its data several times): it
  takes its number from ``SFTPClient.request_number`` and files its reply in ``SFTPClient._expecting``
  under ``SFTPClient._lock``, as ``_async_request`` does, and sends with ``BaseSFTP._write_all(out)``;
* ``BaseSFTP._send_version()``, which ``SFTPClient.__init__`` calls for the INIT/VERSION exchange and
  which drops the server's extension list: ``ExtensionAwareSftpClient`` overrides it, speaking the same
  exchange with ``_send_packet(kind, message)`` and ``_read_packet()`` and keeping the list.

The SFTP protocol's numbers (request kinds, open flags, status codes) come from
``paramiko.sftp``, which paramiko does not document; a file's attributes are read from a reply with
``SFTPAttributes._from_msg(message)``. An upload's file is opened here, not as an ``SFTPFile``, so
that its handle and its close are ours. ``PipeChannel`` stands in for the SSH channel under an
``SFTPClient``: it has exactly the methods paramiko calls on one.

No other module of the package touches any of this: ``tests/unit/test_paramiko_contract.py`` checks
that, and that every name used here still exists, with the shape called, in the installed paramiko.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import time
from typing import TypeVar

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_HANDLE,
    CMD_INIT,
    CMD_LSTAT,
    CMD_OPEN,
    CMD_RENAME,
    CMD_STAT,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
)

# Status codes (SFTP v3 draft, section 7). FILE_ALREADY_EXISTS is from SFTP v5, which paramiko does not
# name; ProFTPD answers it to a plain rename over an existing file.
STATUS_OK = SFTP_OK
STATUS_OP_UNSUPPORTED = SFTP_OP_UNSUPPORTED
STATUS_FAILURE = SFTP_FAILURE
STATUS_FILE_ALREADY_EXISTS = 11

PIPE_SIZE = 1024 * 1024  # fewer, larger hand-overs between us and ssh
SFTP_VERSION = 3  # the version paramiko speaks and asks for
# A hostile server's VERSION reply cannot make us keep more than this many extensions (each one's name
# and data are bounded by the packet, which paramiko reads whole).
MAX_EXTENSIONS = 64
POSIX_RENAME = "posix-rename@openssh.com"
SSH_CONNECTION_FAILED = 255  # ssh's exit code when the connection failed or was lost
SETTLE_CHECKS, SETTLE_DELAY = 10, 0.02  # how long a closed channel's transport gets to tell it stopped
SSH_EXIT_WAIT = 2.0  # seconds an ssh child whose output ended gets to exit and tell why
Reply = TypeVar("Reply", bound="StatusReply")
# A WRITE as send_write frames it: length, type, request number, handle length; then offset and data length.
_WRITE_HEADER = struct.Struct(">IBII")
_OFFSET_AND_LENGTH = struct.Struct(">QI")


class ExtensionAwareSftpClient(paramiko.SFTPClient):
    """An ``SFTPClient`` that keeps what the server's VERSION reply said: ``server_version`` and
    ``server_extensions`` (name -> data, as sent; the first ``MAX_EXTENSIONS``)."""

    server_version: int = SFTP_VERSION
    server_extensions: dict[str, bytes]

    def _send_version(self) -> int:
        """paramiko's INIT/VERSION exchange, keeping the reply's extension list.

        :returns: the server's SFTP version.
        :raises paramiko.SFTPError: the server answered no VERSION.
        """
        init = paramiko.Message()
        init.add_int(SFTP_VERSION)
        self._send_packet(CMD_INIT, init)
        kind, data = self._read_packet()
        if kind != CMD_VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        self.server_version, self.server_extensions = parse_version_reply(data)
        return self.server_version


def parse_version_reply(data: bytes) -> tuple[int, dict[str, bytes]]:
    """Read an SFTP VERSION reply's body: ``uint32 version`` then pairs of strings (name, data).

    A truncated pair ends the list (what came before it is kept); names are read as UTF-8 with
    replacement, so a hostile name cannot raise.

    :returns: the version and the extensions, name -> data.
    :raises paramiko.SFTPError: the reply is shorter than a version number.
    """
    if len(data) < 4:
        raise paramiko.SFTPError("Incompatible sftp protocol: a VERSION reply without a version")
    version = int.from_bytes(data[:4], "big")
    extensions: dict[str, bytes] = {}
    offset = 4
    while len(extensions) < MAX_EXTENSIONS:
        fields = []
        for _ in range(2):
            if offset + 4 > len(data):
                return version, extensions
            length = int.from_bytes(data[offset:offset + 4], "big")
            if offset + 4 + length > len(data):
                return version, extensions
            fields.append(data[offset + 4:offset + 4 + length])
            offset += 4 + length
        extensions[fields[0].decode("utf-8", "replace")] = fields[1]
    return version, extensions


def server_extensions(client: paramiko.SFTPClient) -> dict[str, bytes] | None:
    """The extensions ``client``'s server offered in its VERSION reply; None when ``client`` did not
    keep them (not an ``ExtensionAwareSftpClient``)."""
    return client.server_extensions if isinstance(client, ExtensionAwareSftpClient) else None


def server_version(client: paramiko.SFTPClient) -> int | None:
    """The SFTP version ``client``'s server answered; None when ``client`` did not keep it."""
    return client.server_version if isinstance(client, ExtensionAwareSftpClient) else None


def open_sftp_channel(transport: paramiko.Transport) -> ExtensionAwareSftpClient:
    """Open an SFTP channel on an authenticated ``transport`` (``SSHClient.open_sftp``'s work), keeping the
    server's extension list.

    :returns: the client, ready for requests.
    :raises OSError, EOFError, paramiko.SSHException: the channel or the version exchange failed.
    """
    client = ExtensionAwareSftpClient.from_transport(transport)
    if client is None:
        raise paramiko.SSHException("the server refused an SFTP channel")
    return client


def channel_is_closed(client: paramiko.SFTPClient) -> bool:
    """Whether the channel under ``client`` has ended (the server closed the SFTP subsystem, or it was
    closed here); a ``PipeChannel`` counts as closed once its ``ssh`` child has ended."""
    channel = client.get_channel()
    if isinstance(channel, PipeChannel):
        return channel.has_ended()
    return bool(getattr(channel, "closed", False) or getattr(channel, "eof_received", False))


def connection_is_lost(client: paramiko.SFTPClient, ended: bool = False) -> bool:
    """Whether the SSH connection under ``client`` is gone (not just its SFTP channel): paramiko's
    transport has stopped, or the ``ssh`` child under a ``PipeChannel`` exited with ssh's own error code
    255 (a remote subsystem that ends makes ssh exit with the subsystem's code instead).

    ``ended``: the channel just ended (EOF), so an ``ssh`` child is given a moment to exit and tell why."""
    channel = client.get_channel()
    if isinstance(channel, PipeChannel):
        return channel.lost_connection(SSH_EXIT_WAIT if ended else 0)
    transport = channel.get_transport() if channel is not None else None
    if transport is None:
        return True
    if channel.closed or channel.eof_received:
        # paramiko's transport thread closes the channels just before it marks itself inactive
        for _ in range(SETTLE_CHECKS):
            if not transport.is_active():
                return True
            time.sleep(SETTLE_DELAY)
    return not transport.is_active()


class StatusReply:
    """What a server answers to one SFTP request: its status (and, for ``HandleReply`` and
    ``AttributesReply``, what the request asked for), with the status code.

    ``send`` files the reply with paramiko under the request's number; whichever ``wait`` reads the
    reply off the channel hands it to its own reply object (replies of several requests in flight
    arrive in any order relative to the waits).
    """

    answer: int | None = None  # the kind of reply besides a status that the request asks for

    def __init__(self) -> None:
        self.kind: int | None = None
        self.packet: bytes | None = None

    @classmethod
    def send(cls: type[Reply], client: paramiko.SFTPClient, kind: int, *args: object) -> Reply:
        """Send one request of ``kind`` (``CMD_…``); its reply is collected by ``wait``.

        :returns: the reply, not yet arrived.
        :raises OSError, EOFError, paramiko.SSHException: the request could not be sent.
        """
        reply = cls()
        client._async_request(reply, kind, *args)
        return reply

    @classmethod
    def request(cls: type[Reply], client: paramiko.SFTPClient, kind: int, *args: object) -> Reply:
        """Send one request and wait for its reply.

        :returns: the arrived reply (any status: ``raise_unless_ok`` turns a refusal into paramiko's error).
        :raises OSError, EOFError, paramiko.SSHException: the exchange failed.
        """
        return cls.send(client, kind, *args).wait(client)

    def wait(self: Reply, client: paramiko.SFTPClient) -> Reply:
        """Read replies off ``client`` until this one has arrived.

        :returns: self.
        :raises OSError, paramiko.SSHException: the exchange failed, or the server answered another kind
            of reply than the request asks for.
        """
        while self.packet is None:
            client._read_response()  # hands each reply to the object filed for it
        return self

    def _async_response(self, kind: int, message: paramiko.Message, number: int) -> None:
        """paramiko's hook: the reply to this request has arrived."""
        if kind != CMD_STATUS and kind != self.answer:
            raise paramiko.SSHException(f"expected an SFTP {'status' if self.answer is None else 'answer'} "
                                        f"reply, got packet type {kind}")
        self.kind = kind
        self.packet = message.get_remainder()

    def _arrived(self) -> bytes:
        if self.packet is None:
            raise RuntimeError("the reply has not arrived: wait for it first")
        return self.packet

    @property
    def status(self) -> int:
        """The server's status code (``STATUS_…``; 0 is OK, as is an answer that is not a status)."""
        packet = self._arrived()
        return paramiko.Message(packet).get_int() if self.kind == CMD_STATUS else STATUS_OK

    def raise_unless_ok(self, client: paramiko.SFTPClient) -> None:
        """Raise what paramiko raises for this status (FileNotFoundError, PermissionError, OSError with
        the server's text, EOFError); nothing for OK or an answer that is not a status."""
        packet = self._arrived()
        if self.kind == CMD_STATUS:
            client._convert_status(paramiko.Message(packet))

    def _answer(self, client: paramiko.SFTPClient) -> paramiko.Message:
        """The answer the request asked for.

        :raises OSError, EOFError: the server refused (as ``raise_unless_ok``).
        :raises paramiko.SSHException: it answered a bare OK instead.
        """
        self.raise_unless_ok(client)
        if self.kind != self.answer:
            raise paramiko.SSHException(f"the SFTP server answered OK without the packet type {self.answer} "
                                        "the request asks for")
        return paramiko.Message(self._arrived())


class HandleReply(StatusReply):
    """The reply to an OPEN: a handle for the requests on the open file."""

    answer = CMD_HANDLE

    def handle(self, client: paramiko.SFTPClient) -> bytes:
        """The open file's handle.

        :raises OSError, EOFError, paramiko.SSHException: the server refused the open (as paramiko
            raises it), or answered no handle.
        """
        return self._answer(client).get_binary()


class AttributesReply(StatusReply):
    """The reply to a STAT or LSTAT: the file's attributes."""

    answer = CMD_ATTRS

    def attributes(self, client: paramiko.SFTPClient) -> paramiko.SFTPAttributes | None:
        """The file's attributes; None when the server answered that there is no such file.

        :raises OSError, EOFError, paramiko.SSHException: the server refused otherwise (as paramiko
            raises it), or answered no attributes.
        """
        try:
            return paramiko.SFTPAttributes._from_msg(self._answer(client))
        except FileNotFoundError:
            return None


def open_new_file(client: paramiko.SFTPClient, path: str) -> bytes:
    """Open ``path`` for writing, created or emptied (what ``SFTPClient.open(path, "wb")`` sends).

    :returns: its handle, for ``send_write`` and ``send_close``.
    :raises OSError, EOFError, paramiko.SSHException: the server refused (as paramiko raises it), or the
        exchange failed.
    """
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
    reply = HandleReply.request(client, CMD_OPEN, path, flags, paramiko.SFTPAttributes())
    return reply.handle(client)


def send_write(client: paramiko.SFTPClient, handle: bytes, offset: int, data: bytes) -> StatusReply:
    """Send a write of ``data`` at ``offset`` into the file open under ``handle``, not waiting.

    Framed here rather than by ``_async_request``: paramiko copies a request's data three times (into a
    ``Message``, out of it, and behind the length) and then, on a channel, what is left of it after
    every SSH packet; here it is copied once and handed to the channel as a memoryview, whose slices are
    free. So large writes cost what small ones do, and need fewer requests and replies.

    :returns: its reply, to ``wait`` for.
    :raises OSError, EOFError, paramiko.SSHException: the request could not be sent.
    """
    reply = StatusReply()
    with client._lock:  # numbered and filed as _async_request does
        number = client.request_number
        client._expecting[number] = reply
        client.request_number += 1
    length = 1 + 4 + 4 + len(handle) + 8 + 4 + len(data)  # type, number, handle, offset, data
    packet = (_WRITE_HEADER.pack(length, CMD_WRITE, number, len(handle)) + handle
              + _OFFSET_AND_LENGTH.pack(offset, len(data)) + data)
    client._write_all(memoryview(packet))
    return reply


def send_close(client: paramiko.SFTPClient, handle: bytes) -> StatusReply:
    """Send the close of the file open under ``handle``, not waiting (after writes still in flight: a server
    handles the requests on one handle in the order sent).

    :returns: its reply, to ``wait`` for.
    :raises OSError, EOFError, paramiko.SSHException: the request could not be sent.
    """
    return StatusReply.send(client, CMD_CLOSE, handle)


def send_stat(client: paramiko.SFTPClient, path: str, follow_links: bool = True) -> AttributesReply:
    """Send a STAT of ``path`` (an LSTAT when not ``follow_links``), not waiting.

    :returns: its reply, to ``wait`` for.
    :raises OSError, EOFError, paramiko.SSHException: the request could not be sent.
    """
    return AttributesReply.send(client, CMD_STAT if follow_links else CMD_LSTAT, path)


def posix_rename(client: paramiko.SFTPClient, old: str, new: str) -> StatusReply:
    """Rename ``old`` to ``new`` with posix-rename@openssh.com, which replaces ``new`` in one step.

    Send it only to a server that offers the extension: some close the SFTP channel on an unknown one.

    :returns: the arrived reply: ``STATUS_OP_UNSUPPORTED`` from a server without the extension.
    :raises OSError, EOFError, paramiko.SSHException: the exchange failed.
    """
    return StatusReply.request(client, CMD_EXTENDED, POSIX_RENAME, old, new)


def plain_rename(client: paramiko.SFTPClient, old: str, new: str) -> StatusReply:
    """Rename ``old`` to ``new`` with SFTP v3's rename, which many servers refuse over an existing ``new``.

    :returns: the arrived reply: ``STATUS_FAILURE`` or ``STATUS_FILE_ALREADY_EXISTS`` for an existing ``new``.
    :raises OSError, EOFError, paramiko.SSHException: the exchange failed.
    """
    return StatusReply.request(client, CMD_RENAME, old, new)


class PipeChannel:
    """An ``ssh -s … sftp`` child's pipes with the face of the SSH channel that an ``SFTPClient`` speaks
    over: send, recv, recv_ready, settimeout, get_name and close."""

    def __init__(self, process: subprocess.Popen, timeout: float | None):
        self._process = process
        self._out = process.stdin.fileno()
        self._in = process.stdout.fileno()
        self._timeout = timeout
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def settimeout(self, timeout: float | None) -> None:
        """Limit each wait for the child's output to ``timeout`` seconds (None: no limit)."""
        self._timeout = timeout

    def get_name(self) -> str:
        """The name paramiko's log lines give the channel."""
        return "ssh"

    def send(self, data: bytes) -> int:
        """Write to the child; return the bytes written, 0 once it is gone (paramiko raises EOFError)."""
        try:
            return os.write(self._out, data)
        except BrokenPipeError:
            return 0

    def recv(self, size: int) -> bytes:
        """Read up to ``size`` bytes from the child; b"" at its end.

        :raises TimeoutError: nothing came within the timeout.
        """
        if self._timeout is not None:
            ready, _, _ = select.select([self._in], [], [], self._timeout)
            if not ready:
                raise TimeoutError("timed out")
        return os.read(self._in, size)

    def recv_ready(self) -> bool:
        """Whether ``recv`` would return at once."""
        return bool(select.select([self._in], [], [], 0)[0])

    def has_ended(self) -> bool:
        """Whether the ``ssh`` child has exited."""
        return self._process.poll() is not None

    def lost_connection(self, wait: float = 0) -> bool:
        """Whether the ``ssh`` child exited because its connection failed (ssh's exit code 255), given
        ``wait`` seconds to exit (it closes its pipes just before)."""
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=wait)
        return self._process.poll() == SSH_CONNECTION_FAILED

    def abort(self) -> None:
        """Kill the child at once (its connection is dead: nothing more is to be said on it)."""
        with contextlib.suppress(OSError):
            self._process.kill()

    def close(self) -> None:
        """End the child: close its pipes, then wait briefly, then kill it."""
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def sftp_over_pipe(channel: PipeChannel) -> paramiko.SFTPClient:
    """Speak SFTP's version exchange over ``channel``.

    :returns: the client, ready for requests.
    :raises OSError, EOFError, paramiko.SSHException: the child ended or answered no SFTP.
    """
    return ExtensionAwareSftpClient(channel)

"""One SFTP connection per run (paramiko): login, host keys, and SFTP sessions for the work.

Host keys follow OpenSSH's ``accept-new``: the first contact records the server's key in a
known_hosts file, and from then on any other key is refused. Login is by password, private key or
both (see ``ssh_keys``). Connection-level failures are retried with backoff. Uploads go to a hidden
temp name and are renamed into place, so a receiver never sees a partial file under its final name
(``session.py``); parallel uploads each get a session (an SFTP channel) of the one connection.

A dead connection is dead: the first request that times out or finds it gone ends it for the run
(``session.LinkHealth``), so a partition costs one ``SFTP.TIMEOUT``, not one per remaining request.
SSH keepalives (``SFTP.KEEPALIVE``) keep an idle connection open through NATs while the broker exports,
and a connection lost while idle is opened again, once, before an action fails.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import BinaryIO

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.state.journal import PartialsJournal
from broker_sftp_uploader.sftp.paramiko_internals import connection_is_lost, open_sftp_channel
from broker_sftp_uploader.sftp.session import FAILURES as _FAILURES
from broker_sftp_uploader.sftp.session import LinkHealth, ServerTraits, SftpSession, StopSignal
from broker_sftp_uploader.sftp.session import reason as _reason
from broker_sftp_uploader.sftp.ssh_keys import (
    KnownHosts,
    Login,
    load_known_hosts,
    load_private_key,
    ssh_fingerprint,
)

logger = logging.getLogger(__name__)

# The connect's backoff: doubling from 1 s up to 30 s, each delay jittered to 50-100 % so that runs that
# failed together retry apart.
RETRY_FIRST_DELAY = 1.0
RETRY_MAX_DELAY = 30.0


def gcm_first_transport(sock: socket.socket, **options: object) -> paramiko.Transport:
    """A paramiko ``Transport`` that offers AES-GCM before its other ciphers (``SSHClient.connect``'s
    ``transport_factory``).

    paramiko encrypts every packet in this process, holding the GIL that the Fernet encryption needs
    as well; AES-GCM encrypts and authenticates in one call, where paramiko's first choice, AES-CTR
    with HMAC-SHA2-256, costs half as much again in CPU for an upload. A server without AES-GCM
    gets paramiko's usual order.
    """
    transport = paramiko.Transport(sock, **options)
    security = transport.get_security_options()
    gcm = tuple(name for name in security.ciphers if name.endswith("-gcm@openssh.com"))
    security.ciphers = gcm + tuple(name for name in security.ciphers if name not in gcm)
    return transport


def retry_delay(attempt: int) -> float:
    """Return the seconds to wait after failed connect attempt number ``attempt`` (1, 2, …)."""
    return min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Record an unknown host's key in the known_hosts file (atomically, other lines kept) and accept it."""

    def __init__(self, known_hosts: KnownHosts):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known_hosts.check_not_revoked(hostname, key)
        self.known_hosts.record(hostname, key)
        logger.warning("first connection to %s: recorded its %s host key (%s) in %s",
                       hostname, key.get_name(), ssh_fingerprint(key), self.known_hosts.path)


class _ConnectFailure(SftpError):
    """A connection-level failure (refused, reset, unreachable, timed out, no banner): worth a retry."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SftpConnection:
    """An SSH connection to the configured server with a main SFTP session on the folder.

    Use as a context manager; ``upload``, ``remove`` and ``remove_leftover_parts`` work on the main
    session, ``open_session`` gives another one for a parallel worker.
    """

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
        self._main: SftpSession | None = None
        self.traits = ServerTraits()
        self.health = LinkHealth(self.where)
        self._revived = False  # a connection lost while idle is opened again once per run

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
                delay = retry_delay(attempt)
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
                           allow_agent=False, look_for_keys=False, auth_strategy=login,
                           transport_factory=gcm_first_transport)
            transport = client.get_transport()
            if settings.keepalive:  # sent only while nothing else is: an idle login stays open through NATs
                transport.set_keepalive(settings.keepalive)
            sftp = open_sftp_channel(transport)
            sftp.get_channel().settimeout(settings.timeout)
        except paramiko.BadHostKeyException as error:
            client.close()
            presented = f"{error.key.get_name()} {ssh_fingerprint(error.key)}"
            recorded = ssh_fingerprint(error.expected_key)
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
        self._client = client
        # A dead connection is closed at once: a thread blocked writing to it wakes up, nothing more is sent.
        self.health = LinkHealth(self.where, on_dead=client.get_transport().close)
        self.traits.server_software = client.get_transport().remote_version
        self._begin(sftp)

    def _begin(self, client: paramiko.SFTPClient) -> None:
        """Make ``client`` the main session, once the folder proved usable (else close and raise)."""
        self.traits.learn_version_reply(client)
        self._main = SftpSession(client, self.folder, self.where, journal=self.journal, traits=self.traits,
                                 reopen=self._new_channel, health=self.health)
        try:
            client.stat(self.folder)
        except OSError as error:
            self.close()
            raise SftpError(f"remote folder {self.folder!r} is not usable on {self.where} "
                            f"({_reason(error)}); create it or fix SFTP.FOLDERNAME") from None

    def close(self) -> None:
        """Close the sessions and the connection (idempotent)."""
        with deferred():
            if self._main is not None:
                self._main.close()
            if self._client is not None:
                self._client.close()
            self._main = self._client = None

    @property
    def main(self) -> SftpSession:
        """The session opened with the connection (connected again if the connection was lost while idle).

        :raises SftpError: not connected, or the connection was lost and cannot be opened again.
        """
        if self._main is None:
            raise SftpError(f"not connected to {self.where}")
        self._revive_if_lost_while_idle()
        return self._main

    def _revive_if_lost_while_idle(self) -> None:
        """Connect again, once per run, if the connection was lost while no request was on it (a NAT or
        firewall that dropped it while the broker exported); a connection a request found dead stays so.

        :raises SftpError: the new connection failed.
        """
        if self._revived or self._main is None or self.health.failed_once:
            return
        if not connection_is_lost(self._main.client):
            return
        self._revived = True
        logger.warning("the connection to %s was lost while idle; connecting again", self.where)
        self.close()
        self.connect(self.deadline)

    def open_session(self, stop: StopSignal | None = None) -> SftpSession:
        """Another SFTP session (channel) of this connection, for a worker thread; close it after use.

        :raises SftpError: the server refused another channel.
        """
        if self._client is None:
            raise SftpError(f"not connected to {self.where}")
        self._revive_if_lost_while_idle()
        self.health.check()
        try:
            with deferred():
                client = self._new_channel()
        except _FAILURES as error:
            raise SftpError(f"cannot open another SFTP session on {self.where}: {_reason(error)}") from None
        return SftpSession(client, self.folder, self.where, journal=self.journal, traits=self.traits,
                           stop=stop, reopen=self._new_channel, health=self.health)

    def _new_channel(self) -> paramiko.SFTPClient:
        """Another SFTP channel on the SSH connection, with the configured timeout.

        :raises SftpError: not connected.
        :raises OSError, EOFError, paramiko.SSHException: the server refused the channel.
        """
        if self._client is None:
            raise SftpError(f"not connected to {self.where}")
        client = open_sftp_channel(self._client.get_transport())
        client.get_channel().settimeout(self.settings.timeout)
        return client

    def upload(self, source: BinaryIO, name: str, size: int | None = None) -> int:
        """``SftpSession.upload`` on the main session."""
        return self.main.upload(source, name, size)

    def remove(self, name: str, quiet: bool = False) -> bool:
        """``SftpSession.remove`` on the main session."""
        return self.main.remove(name, quiet)

    def remove_leftover_parts(self) -> int:
        """``SftpSession.remove_leftover_parts`` on the main session."""
        return self.main.remove_leftover_parts()

    def __enter__(self) -> SftpConnection:
        return self.connect(self.deadline)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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

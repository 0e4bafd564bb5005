"""``SFTP.TRANSPORT = "openssh"``: the SFTP protocol spoken by paramiko over an OpenSSH ``ssh`` child.

paramiko does the SSH cipher and framing in Python, on the same core as the Fernet encryption, which
caps a large upload at about half of what OpenSSH's own ``sftp`` reaches. Here every SFTP session is
an ``ssh -s … sftp`` process: the SSH work moves into C on the other core, and paramiko's
``SFTPClient`` only frames SFTP requests into its pipes (``paramiko_internals.PipeChannel``). The
uploads themselves (temp name, journal, rename) are the same code as for the default transport
(``session.py``).

The same config keys apply: the known_hosts file with the same accept-new / strict behaviour (the
file is checked by our reader first, so a broken line gives the same error), ``PRIVATE_KEY``
(``IdentitiesOnly``, no agent), the timeouts and the exit codes. A password or key passphrase reaches
``ssh`` through ``SSH_ASKPASS`` (forced, so no terminal is needed): a helper script in a private
0700 folder prints it from a 0600 file beside it. The secret is never on a command line nor in any
process's environment, and the folder is removed when the connection closes. ``ssh`` reads the
system's and the user's ssh_config as usual (ProxyJump, certificates...), but the options above are
given on its command line, which takes precedence.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import paramiko

from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.sftp.connection import SftpConnection, _ConnectFailure
from broker_sftp_uploader.sftp.paramiko_internals import PipeChannel, sftp_over_pipe
from broker_sftp_uploader.sftp.session import LinkHealth, SftpSession, StopSignal
from broker_sftp_uploader.sftp.ssh_keys import known_hosts_bytes, load_known_hosts

logger = logging.getLogger(__name__)

# Asked by ssh through SSH_ASKPASS: a key's passphrase or the password, told apart by the prompt.
_ASKPASS = """#!/bin/sh
case "$1" in
  *assphrase*) exec cat "$(dirname "$0")/passphrase" ;;
  *assword*) exec cat "$(dirname "$0")/password" ;;
esac
exit 1
"""
# What ssh says on stderr, mapped to our messages; the first match wins.
_HOST_KEY_CHANGED = ("REMOTE HOST IDENTIFICATION HAS CHANGED", "Host key verification failed")
_LOGIN_REFUSED = ("Permission denied",)
_TRANSIENT = ("Connection refused", "Connection timed out", "timed out", "Connection reset",
              "Connection closed by", "No route to host", "Network is unreachable", "kex_exchange_identification")


class OpensshConnection(SftpConnection):
    """Like ``SftpConnection``, with every SFTP session an ``ssh`` child process."""

    def __init__(self, *args, ssh: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._ssh = ssh or shutil.which("ssh") or "/usr/bin/ssh"
        self._secrets: Path | None = None
        self._channels: list[PipeChannel] = []
        self._lock = threading.Lock()

    def _open(self, key: paramiko.PKey | None, timeout: float) -> None:
        """Start the main session's ssh child, check the host key and login, open SFTP on the folder."""
        settings = self.settings
        # Our own reader first: a broken known_hosts line gets the same message as with paramiko.
        load_known_hosts(settings.known_hosts, paramiko.HostKeys())
        if not os.access(self._ssh, os.X_OK):
            raise SftpError(f"SFTP.TRANSPORT is \"openssh\" but {self._ssh} cannot be run; install the "
                            "OpenSSH client (openssh-client) or use the default transport")
        self._write_secrets()
        before = known_hosts_bytes(settings.known_hosts)
        client = self._start_session(timeout)
        if known_hosts_bytes(settings.known_hosts) != before:  # ssh's accept-new recorded a new host key
            logger.warning("first connection to [%s]:%s: recorded its host key in %s", settings.host,
                           settings.port, settings.known_hosts)
        self._client = None
        # A dead connection's ssh children are ended at once (each is its own TCP connection, but they
        # share the network to the server: one timing out means the others are about to).
        self.health = LinkHealth(self.where, on_dead=self._abort_sessions)
        self._begin(client)

    def _abort_sessions(self) -> None:
        """Kill every session's ssh child (the connection is dead)."""
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.abort()

    def _write_secrets(self) -> None:
        if self._secrets is not None:
            return
        parent = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())  # RAM first
        _remove_orphaned_secrets(parent)
        folder = Path(tempfile.mkdtemp(prefix=f"{_SECRETS_PREFIX}{os.getpid()}-", dir=parent))
        self._secrets = folder  # mkdtemp: mode 0700
        for name, value in (("password", self.settings.password),
                            ("passphrase", self.settings.private_key_passphrase)):
            if value is not None:
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(value + "\n")
        script = folder / "askpass"
        script.write_text(_ASKPASS)
        script.chmod(0o700)

    def _command(self, timeout: float) -> list[str]:
        settings = self.settings
        options = {
            "UserKnownHostsFile": str(settings.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "accept-new",
            "HashKnownHosts": "no",
            "UpdateHostKeys": "no",
            "ConnectTimeout": str(max(1, round(timeout))),
            # ssh's keepalives keep an idle session open through NATs and end a dead one within TIMEOUT
            "ServerAliveInterval": str(_alive_interval(settings.timeout, settings.keepalive)),
            "ServerAliveCountMax": "3",
            "IdentityAgent": "none",
            "IdentitiesOnly": "yes",
            "NumberOfPasswordPrompts": "1",
            "PasswordAuthentication": "yes" if settings.password is not None else "no",
            "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes" if settings.private_key is not None else "no",
            "ForwardAgent": "no",
            "ClearAllForwardings": "yes",
            "Compression": "no",
            "Ciphers": "^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
            "LogLevel": "ERROR",
        }
        command = [self._ssh, "-s", "-p", str(settings.port), "-l", settings.username, "-x", "-T"]
        if settings.private_key is not None:
            command += ["-i", str(settings.private_key)]
        for name, value in options.items():
            command += ["-o", f"{name}={value}"]
        return [*command, "--", settings.host, "sftp"]

    def _start_session(self, timeout: float) -> paramiko.SFTPClient:
        """Start one ``ssh`` child and speak SFTP's version exchange over it.

        :raises _ConnectFailure: a connection-level failure (worth a retry).
        :raises SftpError: host key refused, login refused, or another failure ssh reported.
        """
        assert self._secrets is not None
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith(("SSH_AUTH_SOCK", "SSH_ASKPASS", "DISPLAY", "BROKER_SFTP_UPLOADER_"))}
        environment.update(SSH_ASKPASS=str(self._secrets / "askpass"), SSH_ASKPASS_REQUIRE="force")
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - ssh writes to it for the session's lifetime
        # A session of its own: Ctrl-C at the terminal reaches only us, and we end ssh when we are done.
        process = subprocess.Popen(self._command(timeout), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=errors, env=environment, start_new_session=True)
        channel = PipeChannel(process, timeout)
        try:
            with deferred():
                client = sftp_over_pipe(channel)
        except (OSError, EOFError, paramiko.SSHException):
            channel.close()
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace")
            errors.close()
            raise self._failure(said) from None
        errors.close()
        client.get_channel().settimeout(self.settings.timeout)
        with self._lock:
            self._channels.append(channel)
        return client

    def _failure(self, said: str) -> SftpError:
        settings = self.settings
        server = f"{settings.host}:{settings.port}"
        line = next((text.strip() for text in said.splitlines() if text.strip()), "ssh ended without a word")
        if any(marker in said for marker in _HOST_KEY_CHANGED):
            presented = re.search(r"SHA256:[A-Za-z0-9+/]+", said)
            shown = f" ({presented.group(0)})" if presented else ""
            return SftpError(f"the host key of {server}{shown} does not match the one recorded in "
                             f"{settings.known_hosts}; if the server's key really changed, confirm the new "
                             "fingerprint with its admin and replace its line there")
        if any(marker in said for marker in _LOGIN_REFUSED):
            what = " and ".join(name for name, value in (("SFTP.PRIVATE_KEY", settings.private_key),
                                                        ("SFTP.PASSWORD", settings.password)) if value)
            return SftpError(f"SFTP login as {self.where} was refused; check SFTP.USERNAME and {what}")
        if any(marker in said for marker in _TRANSIENT):
            return _ConnectFailure(line[:200])
        return SftpError(f"cannot connect to SFTP server {server} with ssh: {line[:200]}")

    def open_session(self, stop: StopSignal | None = None) -> SftpSession:
        """Another SFTP session: another ``ssh`` child (another login)."""
        if self._main is None:
            raise SftpError(f"not connected to {self.where}")
        self._revive_if_lost_while_idle()
        self.health.check()
        try:
            client = self._start_session(self.settings.timeout)
        except _ConnectFailure as failure:
            raise SftpError(f"cannot open another SFTP session on {self.where}: {failure.reason}") from None
        return SftpSession(client, self.folder, self.where, journal=self.journal, traits=self.traits,
                           stop=stop, reopen=self._new_channel, health=self.health)

    def _new_channel(self) -> paramiko.SFTPClient:
        """Another SFTP session: another ``ssh`` child.

        :raises SftpError: ssh could not log in again.
        """
        return self._start_session(self.settings.timeout)

    def close(self) -> None:
        """Close every session's ssh child and remove the askpass folder (idempotent)."""
        with deferred():
            if self._main is not None:
                self._main.close()
            self._main = None
            with self._lock:
                channels, self._channels = self._channels, []
            for channel in channels:
                channel.close()
            if self._secrets is not None:
                shutil.rmtree(self._secrets, ignore_errors=True)
                self._secrets = None


_SECRETS_PREFIX = "bsu-askpass-"


def _alive_interval(timeout: float, keepalive: int) -> int:
    """ssh's ServerAliveInterval: a third of ``timeout`` (three unanswered ones end a dead connection
    within it), or ``keepalive`` (``SFTP.KEEPALIVE``) when that is shorter and not 0."""
    interval = max(1, round(timeout / 3))
    return min(interval, keepalive) if keepalive else interval


def _remove_orphaned_secrets(parent: Path) -> None:
    """Remove askpass folders of ours whose run died without closing (``kill -9``): their pid is gone."""
    for folder in parent.glob(f"{_SECRETS_PREFIX}*-*"):
        try:
            pid = int(folder.name[len(_SECRETS_PREFIX):].split("-", 1)[0])
            if folder.lstat().st_uid != os.geteuid() or not folder.is_dir() or folder.is_symlink():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a run that was killed", folder)
        except (ValueError, OSError):
            continue

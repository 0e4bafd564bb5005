"""A small SFTP server of our own (asyncssh's server side) that misbehaves on demand, as real servers do.

``stock`` is asyncssh's SFTP server as it ships (it offers ``posix-rename@openssh.com``; its plain
RENAME refuses an existing target), only logged. None of the other behaviours advertises
``posix-rename@openssh.com`` in the VERSION reply (and the server answers it like any unknown
extension). Each is one way a receiver's server treats the requests a sync sends:

* ``close-on-unknown-extension``: an unknown extended request gets "Bad message", then the SFTP
  channel is closed (the SSH connection lives on); RENAME refuses an existing target;
* ``copying-rename``: RENAME copies the file and leaves the source name behind;
* ``refusing-rename``: RENAME onto an existing name fails ("File already exists");
* ``overwriting-rename``: RENAME replaces an existing name;
* ``truncating-rename``: RENAME replaces, and the file loses its last byte (a broken or hostile server);
* ``short-write``: every WRITE is acknowledged, but its last byte is not stored (a full or broken disk);
* ``lagging-stat``: the first STAT of each temp name (``.<name>.part-…``) answers 0 bytes, as from a
  server that handled it before the CLOSE sent just ahead of it was done; later STATs are true.

The server runs in a child process (``OddSftpServer``, a ``ServerProcess``), so its changes to
asyncssh's handler stay there; every request of interest is logged in ``log_path`` as
``REQUEST <kind> <arguments>``, for tests to count what reached the server.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import secrets
import shutil
import sys
from pathlib import Path

from test_resources.password_sftp import PasswordSftpServer
from test_resources.server_process import ServerUnavailable

BEHAVIOURS = ("stock", "close-on-unknown-extension", "copying-rename", "refusing-rename",
              "overwriting-rename", "truncating-rename", "short-write", "lagging-stat")
POSIX_RENAME = b"posix-rename@openssh.com"
READY = "odd-sftp-server listening on"


class OddSftpServerUnavailable(ServerUnavailable):
    """asyncssh is not installed."""


class OddSftpServer(PasswordSftpServer):
    """Our misbehaving SFTP server on 127.0.0.1 with one password user; use as a context manager."""

    name = "odd-sftp-server"

    def __init__(self, base_dir: Path, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
        super().__init__(base_dir)
        self.behaviour = behaviour

    @staticmethod
    def check_available() -> None:
        """:raises OddSftpServerUnavailable: asyncssh cannot be imported."""
        try:
            import asyncssh  # noqa: F401
        except ImportError:
            raise OddSftpServerUnavailable("asyncssh is missing; install the test extra: "
                                           "pip install -e '.[test]'") from None

    def _command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "test_resources.odd_sftp_server", "--port", str(port), "--root",
                str(self.sftp_root), "--host-key", str(self.host_key_path), "--behaviour", self.behaviour,
                "--password-env", "ODD_SFTP_PASSWORD"]

    def _launch(self, port: int) -> bool:
        os.environ["ODD_SFTP_PASSWORD"] = self.password  # read by the child at start, never logged
        try:
            return super()._launch(port)
        finally:
            os.environ.pop("ODD_SFTP_PASSWORD", None)

    def _ready(self, log_text: str, port: int) -> bool:
        return f"{READY} {port}" in log_text

    def requests(self, kind: str) -> list[str]:
        """The logged requests of ``kind`` (RENAME, EXTENDED), their arguments as logged."""
        prefix = f"REQUEST {kind} "
        return [line[len(prefix):] for line in self.log_text().splitlines() if line.startswith(prefix)]


# --- the child process ------------------------------------------------------------------------------------


def _log(line: str) -> None:
    print(line, flush=True)


def _serve(port: int, root: Path, host_key: Path, behaviour: str, password: str) -> None:
    import asyncssh
    from asyncssh import sftp

    handler = sftp.SFTPServerHandler
    stock = behaviour == "stock"
    # Not offered, and answered like any extension the server does not know (stock: as shipped).
    handler._extensions = [pair for pair in handler._extensions if stock or pair[0] != POSIX_RENAME]
    handlers = {kind: work for kind, work in handler._packet_handlers.items()
                if stock or kind != POSIX_RENAME}

    if behaviour == "close-on-unknown-extension":
        async def unknown_extension(self, packet):
            _log("REQUEST EXTENDED unknown: answered Bad message, channel closed")
            asyncio.get_running_loop().call_soon(self._writer.close)  # after the status reply is sent
            raise sftp.SFTPBadMessage("Bad message")

        class ClosingOnUnknown(dict):
            def get(self, kind, default=None):
                if isinstance(kind, bytes) and kind not in self:
                    return unknown_extension
                return super().get(kind, default)

        handlers = ClosingOnUnknown(handlers)
    original_process = handler._process_packet

    async def logged_process(self, kind, number, packet):
        if kind == sftp.FXP_EXTENDED:
            remaining = packet.get_remaining_payload()  # the extension's name, then its arguments
            length = int.from_bytes(remaining[:4], "big")
            _log(f"REQUEST EXTENDED {remaining[4:4 + min(length, 100)].decode(errors='replace')}")
        return await original_process(self, kind, number, packet)

    handler._packet_handlers = handlers
    handler._process_packet = logged_process

    stats_seen: set[bytes] = set()  # lagging-stat: the temp names whose first STAT was answered

    class Files(asyncssh.SFTPServer):
        def __init__(self, channel):
            super().__init__(channel, chroot=str(root))

        def rename(self, oldpath: bytes, newpath: bytes) -> None:
            _log(f"REQUEST RENAME {oldpath.decode(errors='replace')} {newpath.decode(errors='replace')}")
            if stock:
                return super().rename(oldpath, newpath)
            old, new = self.map_path(oldpath), self.map_path(newpath)
            if behaviour == "copying-rename":
                shutil.copyfile(old, new)
            elif behaviour == "overwriting-rename":
                os.replace(old, new)
            elif behaviour == "truncating-rename":
                os.replace(old, new)
                os.truncate(new, max(0, os.path.getsize(new) - 1))
            elif os.path.lexists(new):
                raise sftp.SFTPFailure("File already exists")
            else:
                os.rename(old, new)

        def write(self, file_obj, offset: int, data: bytes) -> int:
            if behaviour == "short-write" and data:
                super().write(file_obj, offset, data[:-1])
                return len(data)
            return super().write(file_obj, offset, data)

        def stat(self, path: bytes):
            _log(f"REQUEST STAT {path.decode(errors='replace')}")
            if behaviour == "lagging-stat" and b".part-" in path and path not in stats_seen:
                stats_seen.add(path)
                return sftp.SFTPAttrs(type=sftp.FILEXFER_TYPE_REGULAR, size=0, permissions=0o100600)
            return super().stat(path)

    class Logins(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return username == PasswordSftpServer.username and secrets.compare_digest(given, password)

    async def main() -> None:
        await asyncssh.listen("127.0.0.1", port, server_host_keys=[str(host_key)], server_factory=Logins,
                              sftp_factory=Files, allow_scp=False)
        _log(f"{READY} {port} ({behaviour})")
        await asyncio.Event().wait()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    """Serve until killed (the parent's ``ServerProcess.stop``)."""
    parser = argparse.ArgumentParser(prog="python -m test_resources.odd_sftp_server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host-key", type=Path, required=True)
    parser.add_argument("--behaviour", choices=BEHAVIOURS, required=True)
    parser.add_argument("--password-env", required=True, help="the environment variable with the password")
    args = parser.parse_args(argv)
    try:
        _serve(args.port, args.root, args.host_key, args.behaviour, os.environ[args.password_env])
    except OSError as error:
        # "Address already in use" lets the parent pick another port
        _log("odd-sftp-server: Address already in use" if error.errno == errno.EADDRINUSE
             else f"odd-sftp-server: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

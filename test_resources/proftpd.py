"""Launch a throw-away ProFTPD (mod_sftp) on 127.0.0.1: a second, independent SFTP server for the tests.

One virtual user (``AuthUserFile``, no system account; files belong to ``nobody:nogroup``) logs in
with a random password and is chrooted to ``sftp_root``, so relative remote paths resolve inside
it. ``posix_rename=False`` switches off the ``posix-rename@openssh.com`` extension
(``SFTPExtensions -posixRename``): the server then only has SFTP v3's plain rename, which refuses
an existing target. In the folder ``no-rename`` every rename is refused (``<Limit RNTO>``).
ProFTPD's own defaults stay in force otherwise, e.g. ``AllowOverwrite off``. Standalone::

    python -m test_resources.proftpd --base-dir DIR [--folder rki ...] [--no-posix-rename]

prints one JSON line, writes the same to ``DIR/proftpd.json`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import grp
import hashlib
import os
import pwd
import re
import secrets
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from test_resources.server_process import ServerProcess, ServerUnavailable, find_program, serve_until_signal

USERNAME = "bsu-proftpd"
NO_RENAME_FOLDER = "no-rename"
FIX_HINT = "run as root after `apt-get install -y proftpd-core proftpd-mod-crypto openssl`"


class ProftpdUnavailable(ServerUnavailable):
    """ProFTPD with mod_sftp cannot be launched on this machine (missing packages or not root)."""


def _tool(name: str) -> str:
    """Absolute path of a required program; :raises ProftpdUnavailable: it is not installed."""
    return find_program(name, ProftpdUnavailable, FIX_HINT)


def _module_dir(proftpd: str) -> Path:
    """Given the proftpd binary, return its shared module folder; :raises ProftpdUnavailable: no mod_sftp."""
    version = subprocess.run([proftpd, "-V"], check=False, capture_output=True, text=True).stdout
    match = re.search(r"Shared Module Directory:\s*(\S+)", version)
    folder = Path(match.group(1) if match else "/usr/lib/proftpd")
    if not (folder / "mod_sftp.so").exists():
        raise ProftpdUnavailable(f"mod_sftp.so not found in {folder}; {FIX_HINT}")
    return folder


def _password_hash(password: str) -> str:
    """SHA-512 crypt(3) hash for AuthUserFile (Python's crypt module is gone in 3.13)."""
    proc = subprocess.run([_tool("openssl"), "passwd", "-6", "-stdin"], input=password, check=False,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl passwd failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


class ProftpdServer(ServerProcess):
    """A real ProFTPD serving SFTP only on 127.0.0.1; use as a context manager.

    ``base_dir`` holds config, host key, password file, log and ``sftp/`` (the user's root).
    """

    name = "proftpd"
    username = USERNAME

    def __init__(self, base_dir: Path, folders: tuple[str, ...] = ("rki",),
                 posix_rename: bool = True) -> None:
        super().__init__()
        self.base_dir = Path(base_dir).absolute()
        if any(c.isspace() or c in "%\"'<>" for c in str(self.base_dir)):
            raise ValueError(f"base_dir must not contain whitespace, quotes, '<>' or '%': {self.base_dir}")
        self.folders = tuple(folders)
        self.posix_rename = posix_rename
        self.sftp_root = self.base_dir / "sftp"
        self.log_path = self.base_dir / "proftpd.log"
        self.password: str | None = None
        self.host_public_key_line: str | None = None
        self.host_key_fingerprint: str | None = None
        self._host_key = self.base_dir / "host_ed25519_key"
        self._password_file = self.base_dir / "passwd"
        self._owner = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)

    @staticmethod
    def check_available() -> None:
        """Raise ProftpdUnavailable unless ProFTPD with mod_sftp can be launched here."""
        if os.geteuid() != 0:
            raise ProftpdUnavailable(f"ProFTPD binds, chroots and switches users as root; {FIX_HINT}")
        _module_dir(_tool("proftpd"))
        _tool("openssl")

    def folder(self, name: str) -> Path:
        """Local path of folder ``name`` under sftp_root, created writable for the SFTP user."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"folder name must be relative and stay inside sftp_root: {name!r}")
        path = self.sftp_root / rel
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *self._owner)
        path.chmod(0o755)
        return path

    def _prepare(self) -> None:
        """Create folders, the virtual user and an ed25519 host key for this launch."""
        self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.sftp_root.mkdir(exist_ok=True)
        self.sftp_root.chmod(0o755)
        # ProFTPD resolves the chroot ("DefaultRoot ~") as the user: 0700 parents (mkdtemp) get o+x.
        for parent in self.sftp_root.parents:
            if not (mode := parent.stat().st_mode) & 0o001:
                parent.chmod(mode & 0o7777 | 0o001)
        for name in self.folders:
            self.folder(name)

        self.password = secrets.token_urlsafe(18)
        uid, gid = self._owner
        self._password_file.write_text(
            f"{USERNAME}:{_password_hash(self.password)}:{uid}:{gid}::{self.sftp_root}:/usr/sbin/nologin\n")
        self._password_file.chmod(0o600)

        key = Ed25519PrivateKey.generate()
        self._host_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
        self._host_key.chmod(0o600)  # mod_sftp refuses a group- or world-readable host key
        self.host_public_key_line = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        digest = hashlib.sha256(base64.b64decode(self.host_public_key_line.split()[1])).digest()
        self.host_key_fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def _config(self, port: int, module_dir: Path) -> str:
        """proftpd.conf: SFTP only, one virtual password user chrooted to sftp_root, one log.

        No ``User``: the listener stays root, because the kernel drops setpriv's parent-death signal
        when a process changes its user, and a listener that dropped to ``nobody`` outlived killed tests.
        """
        lines = [
            "ServerType standalone", 'ServerName "broker-sftp-uploader tests"',
            f"DefaultAddress {self.host}", "SocketBindTight on", f"Port {port}", "UseIPv6 off",
            f"PidFile {self.base_dir}/proftpd.pid", f"ScoreboardFile {self.base_dir}/proftpd.scoreboard",
            f"SystemLog {self.log_path}", "WtmpLog off", "UseReverseDNS off", "DelayEngine off",
            f"ModulePath {module_dir}", "LoadModule mod_sftp.c",
            "AuthPAM off", "AuthOrder mod_auth_file.c", f"AuthUserFile {self._password_file}",
            "RequireValidShell off", "DefaultRoot ~", "Umask 022",
            "SFTPEngine on", f"SFTPLog {self.log_path}", f"SFTPHostKey {self._host_key}",
            "SFTPAuthMethods password",
        ]
        if not self.posix_rename:
            lines.append("SFTPExtensions -posixRename")
        lines += [f"<Directory {self.sftp_root}/{NO_RENAME_FOLDER}>", "  <Limit RNTO>", "    DenyAll",
                  "  </Limit>", "</Directory>", ""]
        return "\n".join(lines)

    def _command(self, port: int) -> list[str]:
        proftpd = _tool("proftpd")
        config = self.base_dir / "proftpd.conf"
        config.write_text(self._config(port, _module_dir(proftpd)))
        check = subprocess.run([proftpd, "-t", "-c", str(config)], check=False, capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"proftpd rejected {config}: {(check.stdout + check.stderr).strip()}")
        return [proftpd, "--nodaemon", "-c", str(config)]

    def _ready(self, log_text: str, port: int) -> bool:
        return "standalone mode STARTUP" in log_text

    def info(self) -> dict[str, object]:
        """Connection details as a JSON-serialisable dict."""
        names = ("host", "port", "username", "password", "sftp_root", "posix_rename", "host_key_fingerprint",
                 "host_public_key_line")
        return {name: str(v) if isinstance(v := getattr(self, name), Path) else v for name in names}



def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print and atomically write the connection details as JSON."""
    parser = argparse.ArgumentParser(prog="python -m test_resources.proftpd",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", type=Path, required=True, help="work dir (created 0755 if missing)")
    parser.add_argument("--folder", action="append", help="upload folder to create (repeatable; default rki)")
    parser.add_argument("--no-posix-rename", action="store_true",
                        help="switch off the posix-rename@openssh.com extension")
    args = parser.parse_args(argv)
    base = args.base_dir.absolute()
    if not base.exists():
        base.mkdir(parents=True)
        base.chmod(0o755)
    server = ProftpdServer(base, tuple(args.folder or ("rki",)), posix_rename=not args.no_posix_rename)
    return serve_until_signal(server, base, "proftpd.json")

if __name__ == "__main__":
    sys.exit(main())

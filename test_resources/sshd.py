"""Launch a throw-away OpenSSH sshd on 127.0.0.1 for SFTP integration tests.

Logins are limited to three system users, created on demand and kept: ``bsu-sftp`` (password),
``bsu-sftpkey`` (public key only) and ``bsu-sftpboth`` (``AuthenticationMethods publickey,password``:
a key and then the password). Client keys of every type (ed25519, ECDSA, RSA) in OpenSSH and PEM
format, each plain or encrypted with ``client_key_passphrase``, are made on demand and authorized
for both key users (see ``client_key``). Every session is forced into ``internal-sftp`` with
``sftp_root`` as start directory, so relative remote paths resolve inside it. Standalone::

    python -m test_resources.sshd --base-dir DIR [--folder rki ...]

prints one JSON line, writes the same to ``DIR/sshd.json`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import grp
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from test_resources.server_process import (ServerProcess, ServerUnavailable, alive, find_program,
                                           serve_until_signal)

GROUP = "bsu-sftp"
PASSWORD_USER = "bsu-sftp"
KEY_USER = "bsu-sftpkey"
BOTH_USER = "bsu-sftpboth"
KEY_TYPES = ("ed25519", "ecdsa", "rsa")
KEY_FORMATS = ("openssh", "pem")
PRIVSEP_DIR = Path("/run/sshd")
STATE_DIR = Path("/run/bsu-sftp-harness")
FIX_HINT = "run as root after `apt-get install -y openssh-server openssh-sftp-server`"


class SshdUnavailable(ServerUnavailable):
    """sshd cannot be launched on this machine (missing binaries or not root)."""


def _tool(name: str) -> str:
    """Absolute path of a required system tool; :raises SshdUnavailable: it is not installed."""
    return find_program(name, SshdUnavailable, FIX_HINT)


def _run(*args: str, stdin: str | None = None, ok: tuple[int, ...] = (0,)) -> None:
    """Run a command, raising RuntimeError with its stderr unless its exit code is in ``ok``."""
    proc = subprocess.run(args, check=False, input=stdin, capture_output=True, text=True)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


class SshdServer(ServerProcess):
    """A real OpenSSH sshd serving SFTP only on 127.0.0.1; use as a context manager.

    ``base_dir`` must stay traversable by the sftp users: keep it out of pytest's ``tmp_path``
    (pytest resets ``/tmp/pytest-of-<user>`` to 0700 whenever another session starts).
    """

    name = "sshd"
    password_user = PASSWORD_USER
    key_user = KEY_USER
    both_user = BOTH_USER

    def __init__(self, base_dir: Path, folders: tuple[str, ...] = ("rki",)) -> None:
        self.base_dir = Path(base_dir).absolute()
        if any(c.isspace() or c in "%\"'" for c in str(self.base_dir)):
            raise ValueError(f"base_dir must not contain whitespace, quotes or '%': {self.base_dir}")
        super().__init__()
        self.folders = tuple(folders)
        self.sftp_root = self.base_dir / "sftp"
        self.log_path = self.base_dir / "sshd.log"
        self.client_key_path = self.base_dir / "client_ed25519"
        self.client_keys_dir = self.base_dir / "client_keys"
        self.client_key_passphrase: str | None = None
        self.password: str | None = None
        self.host_public_key_line: str | None = None
        self.host_key_fingerprint: str | None = None
        self._host_key = self.base_dir / "ssh_host_ed25519_key"
        self._holder = STATE_DIR / f"holder-{os.getpid()}-{id(self)}"

    @staticmethod
    def check_available() -> None:
        """Raise SshdUnavailable unless sshd can be launched here."""
        if os.geteuid() != 0:
            raise SshdUnavailable(f"the sshd test server creates system users; {FIX_HINT}")
        for name in ("sshd", "ssh-keygen", "useradd", "groupadd", "chpasswd", "nologin"):
            _tool(name)

    def client_key(self, key_type: str = "ed25519", key_format: str = "openssh",
                   encrypted: bool = False) -> Path:
        """Path of a client private key (mode 0600) authorized for key_user and both_user.

        ``key_type`` is one of KEY_TYPES, ``key_format`` one of KEY_FORMATS: "openssh" is ssh-keygen's
        default format, "pem" is ``ssh-keygen -m PEM`` (traditional PEM) for ECDSA and RSA, and PKCS#8
        PEM for ed25519, which ssh-keygen cannot write as PEM. Encrypted keys use
        ``client_key_passphrase``. Made on first use (RSA takes a moment) and kept until the next start.
        """
        if key_type not in KEY_TYPES or key_format not in KEY_FORMATS:
            raise ValueError(f"no client key of type {key_type!r} and format {key_format!r}")
        if self.client_key_passphrase is None:
            raise RuntimeError("start the server first")
        path = self.client_keys_dir / f"{key_type}-{key_format}{'-encrypted' if encrypted else ''}"
        if not path.exists():
            passphrase = self.client_key_passphrase if encrypted else ""
            if key_type == "ed25519" and key_format == "pem":
                _write_pkcs8_ed25519(path, passphrase)
            else:
                _run(_tool("ssh-keygen"), "-q", "-t", key_type, "-N", passphrase, "-C", "",
                     *(("-m", "PEM") if key_format == "pem" else ()), "-f", str(path))
            path.chmod(0o600)
            self._authorize(path.with_suffix(".pub").read_text())
        return path

    def _authorize(self, public_key_line: str) -> None:
        """Append a public key to the authorized_keys of both key users (sshd reads them at each login)."""
        for user in (KEY_USER, BOTH_USER):
            with (self.base_dir / "authorized_keys" / user).open("a") as handle:
                handle.write(f"restrict {public_key_line.strip()}\n")

    def folder(self, name: str) -> Path:
        """Local path of upload folder ``name`` under sftp_root (created setgid 2775, group bsu-sftp)."""
        return self._mkdir(name, grp.getgrnam(GROUP).gr_gid, 0o2775)

    def read_only_folder(self, name: str) -> Path:
        """Local path of a root-owned 0755 folder under sftp_root that the users cannot write to."""
        return self._mkdir(name, 0, 0o755)

    def _mkdir(self, name: str, gid: int, mode: int) -> Path:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"folder name must be relative and stay inside sftp_root: {name!r}")
        path = self.sftp_root / rel
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 0, gid)
        path.chmod(mode)
        return path

    def _prepare(self) -> None:
        """Create users, passwords, directories, keys and authorized_keys for this launch."""
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        _run(_tool("groupadd"), "--system", "--force", GROUP)
        for user in (PASSWORD_USER, KEY_USER, BOTH_USER):  # useradd exit code 9: user exists already
            _run(_tool("useradd"), "--system", "--no-create-home", "--home-dir", "/", "--gid", GROUP,
                 "--shell", _tool("nologin"), user, ok=(0, 9))
        self._set_passwords()

        self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.sftp_root.mkdir(exist_ok=True)
        self.sftp_root.chmod(0o755)
        for parent in self.sftp_root.parents:  # e.g. 0700 mkdtemp dirs: add search permission only
            if (mode := parent.stat().st_mode) & 0o011 != 0o011:
                parent.chmod(mode & 0o7777 | 0o011)
        for name in self.folders:
            self.folder(name)

        for key in (self._host_key, self.client_key_path):
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            _run(_tool("ssh-keygen"), "-t", "ed25519", "-N", "", "-C", "", "-q", "-f", str(key))
        key_type, blob = self._host_key.with_suffix(".pub").read_text().split()[:2]
        self.host_public_key_line = f"{key_type} {blob}"
        digest = hashlib.sha256(base64.b64decode(blob)).digest()
        self.host_key_fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

        auth_dir = self.base_dir / "authorized_keys"  # read by sshd with the user's privileges
        auth_dir.mkdir(exist_ok=True)
        auth_dir.chmod(0o755)
        for user in (KEY_USER, BOTH_USER):
            (auth_dir / user).write_text("")
            (auth_dir / user).chmod(0o644)
        self._authorize(self.client_key_path.with_suffix(".pub").read_text())
        shutil.rmtree(self.client_keys_dir, ignore_errors=True)  # client_key() makes them anew
        self.client_keys_dir.mkdir(mode=0o700)
        self.client_key_passphrase = secrets.token_urlsafe(12)

    def _set_passwords(self) -> None:
        """chpasswd the users: a new random password, unless another live server's is still in use.

        The users are machine-wide, so overlapping servers (other sessions, nested fixtures) must
        share one password; the live ones are tracked by holder files in STATE_DIR. The password
        user and the key-and-password user share it; the key-only user gets an unused random one.
        """
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        with (STATE_DIR / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            live = False
            for holder in STATE_DIR.glob("holder-*"):
                if alive(int(holder.name.split("-")[1])):
                    live = True
                else:
                    holder.unlink()
            secret = STATE_DIR / "password"
            self.password = secret.read_text() if live and secret.exists() else secrets.token_urlsafe(18)
            secret.write_text(self.password)
            accounts = {PASSWORD_USER: self.password, BOTH_USER: self.password,
                        KEY_USER: secrets.token_urlsafe(18)}
            _run(_tool("chpasswd"), stdin="".join(f"{u}:{p}\n" for u, p in accounts.items()))
            self._holder.touch()

    def _config(self, port: int) -> str:
        """sshd_config: SFTP only, three users, VERBOSE log; internal-sftp splits its args on spaces."""
        return "\n".join([
            f"ListenAddress {self.host}", f"Port {port}", f"HostKey {self._host_key}", "PidFile none",
            "UsePAM no", "StrictModes no", "PermitRootLogin no",
            f"AllowUsers {PASSWORD_USER} {KEY_USER} {BOTH_USER}",
            "PasswordAuthentication yes", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            f"AuthorizedKeysFile {self.base_dir}/authorized_keys/%u", "LogLevel VERBOSE",
            "AllowTcpForwarding no", "AllowAgentForwarding no", "X11Forwarding no", "PermitTTY no",
            "Subsystem sftp internal-sftp", f"ForceCommand internal-sftp -d {self.sftp_root} -u 0002",
            f"Match User {KEY_USER}", "    PasswordAuthentication no",
            f"Match User {BOTH_USER}", "    AuthenticationMethods publickey,password", "",
        ])

    def _command(self, port: int) -> list[str]:
        config = self.base_dir / "sshd_config"
        config.write_text(self._config(port))
        sshd = _tool("sshd")
        _run(sshd, "-t", "-f", str(config))
        return [sshd, "-D", "-e", "-f", str(config)]

    def _ready(self, log_text: str, port: int) -> bool:
        return f"Server listening on {self.host} port {port}" in log_text

    def stop(self) -> None:
        """Terminate sshd and its session processes (SIGKILL after 5 s); idempotent."""
        self._holder.unlink(missing_ok=True)
        super().stop()

    def info(self) -> dict[str, object]:
        """Connection details as a JSON-serialisable dict."""
        names = ("host", "port", "password_user", "password", "key_user", "client_key_path",
                 "sftp_root", "host_key_fingerprint", "host_public_key_line")
        return {name: str(v) if isinstance(v := getattr(self, name), Path) else v for name in names}



def _write_pkcs8_ed25519(path: Path, passphrase: str) -> None:
    """Write an ed25519 key as PKCS#8 PEM (encrypted if ``passphrase``) and its OpenSSH ``.pub`` beside it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.write_bytes(pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + b"\n")


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print and atomically write the connection details as JSON."""
    parser = argparse.ArgumentParser(prog="python -m test_resources.sshd", description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", type=Path, required=True, help="work dir (created 0755 if missing)")
    parser.add_argument("--folder", action="append", help="upload folder to create (repeatable; default rki)")
    args = parser.parse_args(argv)
    base = args.base_dir.absolute()
    if not base.exists():
        base.mkdir(parents=True)
        base.chmod(0o755)
    return serve_until_signal(SshdServer(base, tuple(args.folder or ("rki",))), base, "sshd.json")

if __name__ == "__main__":
    sys.exit(main())

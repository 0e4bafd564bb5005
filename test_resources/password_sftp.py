"""The common part of the SFTP server launchers with one password user over a local folder (rclone's, our
own misbehaving one): the served root, a fresh ed25519 host key, a random password."""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from test_resources.server_process import ServerProcess


class PasswordSftpServer(ServerProcess):
    """A server of ``username`` with a random ``password``, serving ``base_dir/sftp``; its log is
    ``base_dir/<name>.log``, its host key (OpenSSH format) ``base_dir/host_ed25519_key``."""

    username = "receiver"

    def __init__(self, base_dir: Path) -> None:
        super().__init__()
        self.base_dir = Path(base_dir).absolute()
        self.sftp_root = self.base_dir / "sftp"
        self.log_path = self.base_dir / f"{self.name}.log"
        self.password = secrets.token_urlsafe(18)
        self.host_public_key_line: str | None = None
        self.host_key_path = self.base_dir / "host_ed25519_key"

    def folder(self, name: str) -> Path:
        """Local path of folder ``name`` under the served root, created."""
        path = self.sftp_root / name
        if path.resolve().parent != self.sftp_root.resolve():
            raise ValueError(f"folder name must be one plain name: {name!r}")
        path.mkdir(exist_ok=True)
        return path

    def _prepare(self) -> None:
        """Create the served root and a new host key."""
        self.sftp_root.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        self.host_key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()))
        self.host_key_path.chmod(0o600)
        self.host_public_key_line = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

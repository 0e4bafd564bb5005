"""rclone's SFTP server (``rclone serve sftp``, Debian package ``rclone``) on 127.0.0.1 over a local folder:
an independent SFTP implementation (Go, on github.com/pkg/sftp), with one password user.
"""

from __future__ import annotations

from pathlib import Path

from test_resources.password_sftp import PasswordSftpServer
from test_resources.server_process import ServerUnavailable, find_program

FIX_HINT = "install it with `apt-get install -y rclone`"


class RcloneUnavailable(ServerUnavailable):
    """rclone is not installed."""


class RcloneSftpServer(PasswordSftpServer):
    """``rclone serve sftp`` on ``base_dir/sftp``; use as a context manager."""

    name = "rclone"

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self._no_keys = self.base_dir / "authorized_keys"  # empty: password logins only

    @staticmethod
    def check_available() -> None:
        """:raises RcloneUnavailable: rclone is not on PATH."""
        find_program("rclone", RcloneUnavailable, FIX_HINT)

    def _prepare(self) -> None:
        super()._prepare()
        self._no_keys.write_text("")

    def _command(self, port: int) -> list[str]:
        rclone = find_program("rclone", RcloneUnavailable, FIX_HINT)
        return [rclone, "serve", "sftp", str(self.sftp_root), "--addr", f"{self.host}:{port}", "--user",
                self.username, "--pass", self.password, "--key", str(self.host_key_path), "--authorized-keys",
                str(self._no_keys), "--config", "/dev/null",
                # the tests make folders behind its back: a cached listing (5 minutes by default) misses them
                "--dir-cache-time", "0s", "--poll-interval", "0"]

    def _ready(self, log_text: str, port: int) -> bool:
        return f"SFTP server listening on {self.host}:{port}" in log_text

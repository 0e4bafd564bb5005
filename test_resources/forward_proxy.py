"""Launch a throw-away tinyproxy on 127.0.0.1: a real forward proxy (plain HTTP and ``CONNECT``) for the tests.

Debian's ``tinyproxy-bin`` (the program alone, no service). With ``credentials`` it demands HTTP Basic
proxy authentication (``BasicAuth``) and answers 407 without it. Its log names every request it got
(``requests()``), so a test can tell which calls went through it. Standalone::

    python -m test_resources.forward_proxy --base-dir DIR [--user U --password P]

prints one JSON line, writes the same to ``DIR/forward-proxy.json`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sys
from pathlib import Path

from test_resources.server_process import ServerProcess, ServerUnavailable, serve_until_signal

FIX_HINT = "run `apt-get install -y tinyproxy-bin`"
_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+) HTTP/")


class ForwardProxyUnavailable(ServerUnavailable):
    """tinyproxy cannot be launched on this machine."""


class ForwardProxy(ServerProcess):
    """A real tinyproxy listening on 127.0.0.1; use as a context manager.

    :param base_dir: holds the config and the log.
    :param credentials: (user, password) the proxy demands, or None for an open proxy.
    """

    name = "tinyproxy"

    def __init__(self, base_dir: Path, credentials: tuple[str, str] | None = None):
        super().__init__()
        self.base_dir = Path(base_dir)
        self.credentials = credentials
        self.log_path = self.base_dir / "tinyproxy.log"
        self.config_path = self.base_dir / "tinyproxy.conf"

    @staticmethod
    def check_available() -> None:
        """:raises ForwardProxyUnavailable: no tinyproxy program."""
        if shutil.which("tinyproxy") is None:
            raise ForwardProxyUnavailable(f"`tinyproxy` not found; {FIX_HINT}")

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without credentials."""
        return f"http://{self.host}:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        """The proxy's URL carrying ``user`` and ``password``, as HTTPS_PROXY holds them."""
        return f"http://{user}:{password}@{self.host}:{self.port}"

    def requests(self) -> list[str]:
        """Every request the proxy received so far, as ``METHOD TARGET`` (``CONNECT host:port`` for tunnels)."""
        return _REQUEST_LINE.findall(self.log_text())

    def _prepare(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)

    def _command(self, port: int) -> list[str]:
        lines = [f"Port {port}", f"Listen {self.host}", "Timeout 30", "LogLevel Info", "MaxClients 50",
                 f"Allow {self.host}"]  # no ConnectPort line: CONNECT to any port (the brokers' are random)
        if self.credentials is not None:
            lines.append("BasicAuth {} {}".format(*self.credentials))
        self.config_path.write_text("\n".join(lines) + "\n")
        return [shutil.which("tinyproxy") or "tinyproxy", "-d", "-c", str(self.config_path)]

    def _ready(self, log_text: str, port: int) -> bool:
        return "Accepting connections" in log_text

    def _banner_ok(self, port: int) -> bool:
        """A proxy greets nobody: it is ready once it accepts a connection."""
        try:
            with socket.create_connection((self.host, port), timeout=1):
                return True
        except OSError:
            return False

    def info(self) -> dict[str, object]:
        return {"url": self.url, "port": self.port, "log": str(self.log_path),
                "user": self.credentials[0] if self.credentials else None}


def main(argv: list[str] | None = None) -> int:
    """Standalone mode: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", type=Path, required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args(argv)
    args.base_dir.mkdir(parents=True, exist_ok=True)
    credentials = (args.user, args.password) if args.user else None
    return serve_until_signal(ForwardProxy(args.base_dir, credentials), args.base_dir, "forward-proxy.json")


if __name__ == "__main__":
    sys.exit(main())

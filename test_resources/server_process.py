"""What the throw-away server launchers (sshd.py, proftpd.py, forward_proxy.py) share: finding their
programs, a free port, the launch and the wait for the SSH banner, stopping the server with every session
process, and the standalone mode that serves until SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

PORT_ATTEMPTS = 5
START_TIMEOUT = 10.0


class ServerUnavailable(RuntimeError):
    """A server cannot be launched on this machine (a program is missing, or this is not root)."""


def find_program(name: str, unavailable: type[ServerUnavailable], hint: str) -> str:
    """Absolute path of the program ``name``, also searched for in the sbin folders.

    :raises ServerUnavailable: (as ``unavailable``) it is not installed; the message ends with ``hint``.
    """
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        raise unavailable(f"`{name}` not found; {hint}")
    return os.path.abspath(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listened on a moment ago (it may be taken since)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return _proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids_by_parent() -> dict[int, list[int]]:
    """Every running process's pid, grouped by its parent's pid."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            by_parent.setdefault(int(_proc_stat(entry.name)[1]), []).append(int(entry.name))
    return by_parent


def children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid``."""
    return _pids_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Pids of all descendants of ``pid`` (the server's session processes)."""
    by_parent = _pids_by_parent()
    found, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def send_signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class ServerProcess:
    """A server run in the foreground on 127.0.0.1, its output in ``log_path``; use as a context manager.

    Subclasses set ``name`` and ``log_path`` and provide ``check_available``, ``_prepare`` (users,
    keys, folders), ``_command(port)`` (write and validate the config; return the command line) and
    ``_ready(log_text, port)`` (the log says it listens).
    """

    host = "127.0.0.1"
    name = "server"
    log_path: Path

    def __init__(self) -> None:
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def check_available() -> None:
        """:raises ServerUnavailable: the server cannot be launched here."""

    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _ready(self, log_text: str, port: int) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """Pid of the listener while running."""
        return self._proc.pid if self._proc else None

    def log_text(self) -> str:
        """The whole log."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self) -> Self:
        """Prepare, launch on a free port and wait for the SSH banner."""
        self.check_available()
        if self._proc is not None:
            raise RuntimeError("server already started")
        try:
            self._prepare()
            for _ in range(PORT_ATTEMPTS):
                if self._launch(self._free_port()):
                    return self
            raise RuntimeError(f"{self.name} found no free port in {PORT_ATTEMPTS} attempts; see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def _free_port(self) -> int:
        return free_port(self.host)  # a method, so that a test can hand out a taken port first

    def _launch(self, port: int) -> bool:
        """Run the server on ``port``: False if the port got taken meanwhile, True once it serves."""
        command = self._command(port)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # setpriv (util-linux) makes the kernel SIGTERM the server should this process die without stop()
        setpriv = shutil.which("setpriv")
        guard = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([*guard, *command], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            log_text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in log_text:
                    return False
                raise RuntimeError(f"{self.name} exited early; tail of {self.log_path}:\n{self.log_tail()}")
            if self._ready(log_text, port) and self._banner_ok(port):
                self.port = port
                return True
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s; tail of {self.log_path}:\n"
                           f"{self.log_tail()}")

    def _banner_ok(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1) as sock:
                return sock.makefile("rb").readline().startswith(b"SSH-2.0-")
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the server and its session processes (SIGKILL after 5 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        sessions = descendants(proc.pid)
        send_signal([proc.pid, *sessions], signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 5
        while any(map(alive, sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        send_signal([pid for pid in sessions if alive(pid)], signal.SIGKILL)

    def info(self) -> dict[str, object]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_until_signal(server: ServerProcess, base: Path, info_name: str) -> int:
    """Standalone mode: start ``server``, print and atomically write its details as JSON to
    ``base/info_name``, and serve until SIGTERM/SIGINT; 0 then, 1 if it could not start."""
    for signum in (signal.SIGTERM, signal.SIGINT):  # both -> KeyboardInterrupt (even if SIGINT was ignored)
        signal.signal(signum, signal.default_int_handler)
    info_file = base / info_name
    info_file.unlink(missing_ok=True)
    try:
        server.start()
        line = json.dumps(server.info())
        with tempfile.NamedTemporaryFile("w", dir=base, prefix=f".{info_name}.", delete=False) as tmp:
            tmp.write(line + "\n")
        os.replace(tmp.name, info_file)
        print(line, flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.stop()

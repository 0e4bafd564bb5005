"""Shared fixtures: a real OpenSSH sshd, the broker emulator, and a ready uploader workspace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_sftp_uploader import interrupts
from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors
from test_resources.availability import require_server
from test_resources.broker_actors import ADMIN_KEY
from test_resources.server_process import free_port
from test_resources.sshd import SshdServer

# Child processes (the CLI run as cron runs it) import this checkout's package, whatever copy pip
# installed elsewhere.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def sshd():
    """One real sshd for the whole test session; a missing sshd fails under CI=true."""
    require_server(SshdServer)
    base = Path(tempfile.mkdtemp(prefix="bsu-sshd-"))
    base.chmod(0o755)
    try:
        with SshdServer(base) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def broker(tmp_path):
    """A fresh broker emulator per test."""
    from test_resources.broker_emulator import BrokerEmulator

    with BrokerEmulator(data_dir=tmp_path / "broker-data") as emulator:
        yield emulator


@dataclass
class Workspace:
    """An uploader set-up: working folder, key, config file, and the remote folder to inspect."""

    root: Path
    config_path: Path
    key_path: Path
    remote: Path
    config_text: str

    @property
    def working_dir(self) -> Path:
        return self.root / "work"

    @property
    def ledger(self) -> Path:
        return self.working_dir / "status.xml"

    def rewrite_config(self, old: str, new: str) -> None:
        assert old in self.config_text
        self.config_text = self.config_text.replace(old, new)
        self.config_path.write_text(self.config_text)  # keeps the file's mode

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the installed CLI as cron would: a separate process."""
        command = [sys.executable, "-m", "broker_sftp_uploader", *args]
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=self.root,
                              env={**os.environ, **(env or {})})

    def sync(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `sync` with this config and the ``extra`` options, as `run` does."""
        return self.run("sync", "--config", str(self.config_path), *extra, env=env)

    def partial_uploads(self) -> list[Path]:
        """The uploads in flight on the server: the temporary ``.export_*.part-*`` files."""
        return list(self.remote.glob(".export_*.part-*"))

    def sync_terminated_when(self, condition: Callable[[], bool], awaited: str,
                             timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Start `sync` as cron would, send it SIGTERM as soon as ``condition()`` holds, and return how it
        ended (stderr as text). The test fails if ``awaited`` (what the condition says) is not seen within
        ``timeout`` seconds or before the run ends by itself."""
        command = [sys.executable, "-m", "broker_sftp_uploader", "sync", "-c", str(self.config_path)]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=self.root)
        try:
            deadline = time.monotonic() + timeout
            while not condition() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert condition(), f"{awaited} was not seen"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:  # the test failed: leave no run behind
                process.kill()
                process.communicate()
        return subprocess.CompletedProcess(command, process.returncode, None, stderr)

    def sync_terminated_mid_upload(self, uploads: int = 1) -> subprocess.CompletedProcess:
        """Start `sync`, send it SIGTERM once ``uploads`` partial files are on the server at once, and return
        how it ended (see `sync_terminated_when`)."""
        return self.sync_terminated_when(lambda: len(self.partial_uploads()) >= uploads,
                                         f"{uploads} partial upload(s) on the server at once")

    def pin_host_key(self, sshd) -> None:
        """Record the server's host key in advance, as an admin pinning it would."""
        (self.working_dir / "known_hosts").write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")

    def remote_names(self) -> list[str]:
        return sorted(path.name for path in self.remote.iterdir())


def write_config(path: Path, broker_url: str, server, user: str, password: str, folder: str,
                 key_file: str | Path = "rki.key", sftp_lines: Sequence[str] = ()) -> str:
    """Write a config in the original script's format to ``path`` (mode 0600: it holds secrets); returns
    its text.

    The broker at ``broker_url`` with the admin key, tag rki; ``user`` logs in to ``server`` (its host and
    port) with ``password`` and uploads into ``folder``, with ``sftp_lines`` added to [SFTP]; the Fernet
    key file ``key_file``; the working folder ``work`` next to the config.
    """
    extra = "".join(f"{line}\n" for line in sftp_lines)
    text = f"""\
[BROKER]
URL = "{broker_url}"
API_KEY = "{ADMIN_KEY}"

[REQUESTS]
TAG = "rki"

[SFTP]
HOST = "{server.host}"
PORT = {server.port}
USERNAME = "{user}"
PASSWORD = "{password}"
TIMEOUT = "10"
FOLDERNAME = "{folder}"
{extra}
[SECURITY]
PATH_ENCRYPTION_KEY = "{key_file}"

[MISC]
WORKING_DIR = "work"
"""
    path.write_text(text)
    path.chmod(0o600)  # it holds secrets: a readable one draws a warning
    return text


def make_workspace(tmp_path: Path, broker, server, user: str, password: str, remote_folder: Callable[[str], Path],
                   test_name: str) -> Workspace:
    """A config in the original format pointing at ``broker`` and a new folder on the SFTP ``server``."""
    folder = f"t-{test_name[:40]}-{os.urandom(3).hex()}".replace("[", "-").replace("]", "")
    remote = remote_folder(folder)
    (tmp_path / "work").mkdir()
    key_path = tmp_path / "rki.key"
    generate_key_file(key_path)
    config_path = tmp_path / "settings.toml"
    text = write_config(config_path, broker.url, server, user, password, folder)
    return Workspace(root=tmp_path, config_path=config_path, key_path=key_path, remote=remote,
                     config_text=text)


@pytest.fixture
def workspace(tmp_path, sshd, broker, request) -> Workspace:
    """A config in the original format pointing at this test's broker and its own folder on the sshd."""
    return make_workspace(tmp_path, broker, sshd, sshd.password_user, sshd.password, sshd.folder,
                          request.node.name)


# A ledger holding request 0 at an older completion than the broker's (see ``outdated``).
OUTDATED_LEDGER = (b"<?xml version='1.0' encoding='UTF-8'?>\n<status>\n  <request-status>\n    <id>0</id>\n"
                   b"    <completion>0.5</completion>\n    <uploaded>2021-10-11 09:39:50</uploaded>\n"
                   b"  </request-status>\n</status>\n")


@pytest.fixture
def outdated(broker, workspace, sshd) -> Workspace:
    """A workspace with an outdated ledger: request 0 is completed on the broker (1.0) and held at 0.5 by
    the ledger (``OUTDATED_LEDGER``), so the next sync re-uploads it; the host key pinned."""
    broker_actors.publish_completed(broker.url)
    workspace.ledger.write_bytes(OUTDATED_LEDGER)
    workspace.pin_host_key(sshd)
    return workspace


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (free a moment ago): connecting to it is refused."""
    return free_port("127.0.0.1")


def assert_failed_cleanly(result, code: int, message: str, workspace: Workspace) -> str:
    """The run failed with ``code`` and one ``Error:`` line holding ``message``, and changed nothing."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert message in lines[0]
    assert workspace.ledger.read_bytes() == OUTDATED_LEDGER
    assert workspace.remote_names() == []
    return lines[0]


@pytest.fixture
def signal_handlers():
    """Install the uploader's handlers for one test and give pytest its own back afterwards."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)

"""Shared fixtures: a real OpenSSH sshd, the broker emulator, and a ready uploader workspace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_sftp_uploader import interrupts
from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors
from test_resources.sshd import SshdServer, SshdUnavailable

ADMIN_KEY = "xxxAdmin1234"
CLIENT_1 = "xxxApiKey123"
CLIENT_2 = "xxxApiKey567"
# Child processes (the CLI run as cron runs it) import this checkout's package, whatever copy pip
# installed elsewhere.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def sshd():
    """One real sshd for the whole test session; a missing sshd fails under CI=true."""
    try:
        SshdServer.check_available()
    except SshdUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"sshd is required in CI: {error}")
        pytest.skip(str(error))
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

    def sync(self, *extra: str) -> subprocess.CompletedProcess:
        return self.run("sync", "--config", str(self.config_path), *extra)

    def pin_host_key(self, sshd) -> None:
        """Record the server's host key in advance, as an admin pinning it would."""
        (self.working_dir / "known_hosts").write_text(f"[{sshd.host}]:{sshd.port} {sshd.host_public_key_line}\n")

    def remote_names(self) -> list[str]:
        return sorted(path.name for path in self.remote.iterdir())


def make_workspace(tmp_path: Path, broker, server, user: str, password: str, remote_folder: Callable[[str], Path],
                   test_name: str) -> Workspace:
    """A config in the original format pointing at ``broker`` and a new folder on the SFTP ``server``."""
    folder = f"t-{test_name[:40]}-{os.urandom(3).hex()}".replace("[", "-").replace("]", "")
    remote = remote_folder(folder)
    (tmp_path / "work").mkdir()
    key_path = tmp_path / "rki.key"
    generate_key_file(key_path)
    text = f"""\
[BROKER]
URL = "{broker.url}"
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

[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"

[MISC]
WORKING_DIR = "work"
"""
    config_path = tmp_path / "settings.toml"
    config_path.write_text(text)
    config_path.chmod(0o600)  # it holds secrets: a readable one draws a warning
    return Workspace(root=tmp_path, config_path=config_path, key_path=key_path, remote=remote,
                     config_text=text)


@pytest.fixture
def workspace(tmp_path, sshd, broker, request) -> Workspace:
    """A config in the original format pointing at this test's broker and its own folder on the sshd."""
    return make_workspace(tmp_path, broker, sshd, sshd.password_user, sshd.password, sshd.folder,
                          request.node.name)


# A ledger holding request 0 at an older completion than the broker's (see ``prepared``).
CHANGED_LEDGER = (b"<?xml version='1.0' encoding='UTF-8'?>\n<status>\n  <request-status>\n    <id>0</id>\n"
                  b"    <completion>0.5</completion>\n    <uploaded>2021-10-11 09:39:50</uploaded>\n"
                  b"  </request-status>\n</status>\n")


@pytest.fixture
def prepared(broker, workspace, sshd) -> Workspace:
    """One completed request the ledger holds at an older completion, and the host key pinned."""
    request_id = broker_actors.create_request(broker.url, "rki")
    broker_actors.put_result(broker.url, CLIENT_1, request_id, b"a;b\n")
    broker_actors.post_status(broker.url, CLIENT_1, request_id, "completed")
    workspace.ledger.write_bytes(CHANGED_LEDGER)
    workspace.pin_host_key(sshd)
    return workspace


def assert_failed_cleanly(result, code: int, message: str, workspace: Workspace) -> str:
    """The run failed with ``code`` and one ``Error:`` line holding ``message``, and changed nothing."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert message in lines[0]
    assert workspace.ledger.read_bytes() == CHANGED_LEDGER
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

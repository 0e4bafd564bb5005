"""The network between the uploader and sshd breaks mid-run: a connection reset, or a partition.

A TCP proxy (``test_resources/tcp_fault_proxy.py``) sits between the CLI and the real sshd. The scenario is
the ``kill -9`` one (``test_resources/crash_scenario.py``): the server holds A, B and E; on the broker A was
deleted, B changed, and a large C and a small D appeared. For both transports (paramiko, and OpenSSH's
``ssh`` children):

* every connection is reset after a share of the bytes an uninterrupted run sends: the run exits 3 or 14,
  and the next run, on a sound network, converges (every listed result on the server exactly once and
  right, the deleted one gone, no partial file, the server's status.xml equal to the ledger, an empty
  journal);
* the network freezes mid-upload (no RST, no data): the run ends within a few ``SFTP.TIMEOUT``s of the
  freeze, not one timeout per remaining request, and the next run converges.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_sftp_uploader.config import SftpSettings
from broker_sftp_uploader.crypto import generate_key_file
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.sftp.connection import SftpConnection
from broker_sftp_uploader.sftp.openssh import OpensshConnection
from broker_sftp_uploader.state.journal import PartialsJournal
from test_resources.broker_actors import write_incompressible_file
from test_resources.broker_emulator import BrokerEmulator
from test_resources.crash_scenario import (
    BundleContent,
    ScenarioRequests,
    Site,
    SiteSnapshot,
    bundle_content,
    check_ledger,
    check_remote_files,
    check_working_dir,
    fetch_bundle,
    starting_state,
)
from test_resources.tcp_fault_proxy import TcpFaultProxy
from tests.conftest import write_config

TIMEOUT = 3  # SFTP.TIMEOUT of these runs: small, so that a partition ends a run quickly
LARGE_RESULT_MIB = 8  # C: its upload is most of the bytes a run sends
# Where the connections are cut: shares of the bytes an uninterrupted run sends (login, listing, the
# deletion, the uploads, the ledger).
CUT_SHARES = (0.02, 0.3, 0.6, 0.9)
FREEZE_SHARE = 0.5  # the partition comes in the middle of C's upload
# A frozen run must end within this many TIMEOUTs of the freeze (the promise is about 2; the machine is
# shared and noisy).
FREEZE_BOUND_TIMEOUTS = 4
TRANSPORTS = ("paramiko", "openssh")


@dataclass
class Scenario:
    broker_url: str
    sshd: object
    proxy: TcpFaultProxy
    key_path: Path
    snapshot: SiteSnapshot | None = None
    ids: ScenarioRequests | None = None
    references: dict[str, BundleContent] | None = None
    run_bytes: dict[str, int] | None = None  # per transport: bytes an uninterrupted run sends

    def new_site(self, root: Path, transport: str) -> Site:
        """A new installation under ``root`` that reaches sshd through the proxy, its own remote folder."""
        folder = f"faults-{transport}-{os.urandom(3).hex()}"
        remote = self.sshd.folder(folder)
        working_dir = root / "work"
        working_dir.mkdir(parents=True)
        config_path = root / "settings.toml"
        text = write_config(config_path, self.broker_url, self.proxy, self.sshd.password_user,
                            self.sshd.password, folder, key_file=self.key_path,
                            sftp_lines=[f'TRANSPORT = "{transport}"'])
        assert 'TIMEOUT = "10"' in text
        config_path.write_text(text.replace('TIMEOUT = "10"', f'TIMEOUT = "{TIMEOUT}"'))
        return Site(root=root, config_path=config_path, working_dir=working_dir, remote=remote,
                    key_path=self.key_path)

    def starting_site(self, root: Path, transport: str) -> Site:
        site = self.new_site(root, transport)
        assert self.snapshot is not None
        self.snapshot.restore(site)
        return site


@pytest.fixture(scope="module")
def scenario(sshd, tmp_path_factory):
    """The broker and the starting state, built once; the bytes of an uninterrupted run, per transport."""
    base = tmp_path_factory.mktemp("faults")
    key_path = base / "rki.key"
    generate_key_file(key_path)
    with BrokerEmulator(data_dir=base / "broker-data", download_lifetime=60.0) as broker, \
            TcpFaultProxy(sshd.host, sshd.port) as proxy:
        scenario = Scenario(broker.url, sshd, proxy, key_path)
        large_result = base / "large-result.bin"
        write_incompressible_file(large_result, LARGE_RESULT_MIB)
        scenario.snapshot, scenario.ids = starting_state(
            broker.url, scenario.new_site(base / "template", "paramiko"), large_result)
        scenario.references = {request_id: bundle_content(fetch_bundle(broker.url, request_id))
                               for request_id in scenario.ids.expected_completions()}
        scenario.run_bytes = {}
        for transport in TRANSPORTS:
            site = scenario.starting_site(base / f"measure-{transport}", transport)
            proxy.pass_through()
            clean = site.sync()
            assert clean.returncode == 0, f"an uninterrupted {transport} run failed: {clean.stderr}"
            scenario.run_bytes[transport] = proxy.bytes_forwarded
            assert not violations(scenario, site, before=None), site.describe()
            shutil.rmtree(site.remote)
        yield scenario
    large_result.unlink()
    shutil.rmtree(base / "broker-data", ignore_errors=True)


def violations(scenario: Scenario, site: Site, before) -> list[str]:
    """Everything wrong with ``site`` after a run that should have converged."""
    assert scenario.ids is not None and scenario.references is not None
    return (check_ledger(site, scenario.ids)
            + check_remote_files(site, scenario.ids, scenario.references, before)
            + check_working_dir(site))


def rerun_converges(scenario: Scenario, site: Site) -> None:
    """On a sound network the next run exits 0 and leaves everything right."""
    scenario.proxy.pass_through()
    rerun = site.sync()
    assert rerun.returncode == 0, f"the rerun exited {rerun.returncode}: {rerun.stderr[-2000:]}"
    problems = violations(scenario, site, before=None)
    assert not problems, "\n".join(problems + [site.describe()])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("share", CUT_SHARES, ids=lambda share: f"cut-at-{round(share * 100)}pct")
def test_a_connection_reset_mid_run_exits_3_or_14_and_the_next_run_converges(scenario, transport, share,
                                                                               tmp_path):
    site = scenario.starting_site(tmp_path, transport)
    limit = max(1, int(scenario.run_bytes[transport] * share))
    scenario.proxy.cut_after(limit)
    try:
        cut = site.sync()
        assert cut.returncode in (3, 14), (
            f"cut after {limit} of {scenario.run_bytes[transport]} bytes: exit {cut.returncode}; "
            f"{cut.stderr[-2000:]}")
        assert "Traceback" not in cut.stderr
        rerun_converges(scenario, site)
    finally:
        shutil.rmtree(site.remote, ignore_errors=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_partition_mid_upload_ends_the_run_within_a_few_timeouts_and_the_next_run_converges(
        scenario, transport, tmp_path):
    site = scenario.starting_site(tmp_path, transport)
    proxy = scenario.proxy
    proxy.freeze_after(int(scenario.run_bytes[transport] * FREEZE_SHARE))
    try:
        frozen = site.sync()
        ended = time.monotonic()
        assert proxy.frozen_at is not None, f"the run never reached the freeze: {frozen.stderr[-2000:]}"
        took = ended - proxy.frozen_at
        print(f"{transport}: the frozen run ended {took:.1f} s after the freeze (SFTP.TIMEOUT {TIMEOUT} s); "
              f"it said:\n{frozen.stderr}")
        assert frozen.returncode in (3, 14), f"exit {frozen.returncode}: {frozen.stderr[-2000:]}"
        assert took < FREEZE_BOUND_TIMEOUTS * TIMEOUT, (
            f"the run ended {took:.1f} s after the freeze, over {FREEZE_BOUND_TIMEOUTS} x SFTP.TIMEOUT; "
            f"{frozen.stderr[-2000:]}")
        assert "connection to" in frozen.stderr and "was lost" in frozen.stderr, frozen.stderr[-2000:]
        rerun_converges(scenario, site)
    finally:
        shutil.rmtree(site.remote, ignore_errors=True)


# In-process: one connection through the proxy, idle, lost or kept alive.

IDLE_SECONDS = 3.5  # long enough for a few keepalives one second apart


def open_connection(sshd, proxy: TcpFaultProxy, tmp_path: Path, transport: str, keepalive: int,
                    timeout: float = 10) -> SftpConnection:
    """A connection (not yet open) through ``proxy`` to a new folder of ``sshd``."""
    folder = f"faults-{os.urandom(3).hex()}"
    sshd.folder(folder)
    settings = SftpSettings(host=proxy.host, port=proxy.port, username=sshd.password_user,
                            password=sshd.password, timeout=timeout, folder=folder,
                            known_hosts=tmp_path / "known_hosts", keepalive=keepalive, transport=transport)
    return OpensshConnection(settings) if transport == "openssh" else SftpConnection(settings)


@pytest.fixture
def proxy(sshd):
    with TcpFaultProxy(sshd.host, sshd.port) as proxy:
        yield proxy


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keepalives_flow_while_a_session_is_idle_and_not_when_turned_off(sshd, proxy, tmp_path, transport):
    """SFTP.KEEPALIVE = 1: bytes cross the network while nothing is asked; 0 (paramiko): none."""
    for keepalive in (1, 0) if transport == "paramiko" else (1,):
        with open_connection(sshd, proxy, tmp_path, transport, keepalive) as connection:
            connection.main.list_sizes()
            proxy.pass_through()  # counts anew
            time.sleep(IDLE_SECONDS)
            idle_bytes = proxy.bytes_forwarded
            assert connection.main.list_sizes() == {}
        if keepalive:
            assert idle_bytes > 0, f"no keepalive crossed in {IDLE_SECONDS} s with SFTP.KEEPALIVE = 1"
        else:
            assert idle_bytes == 0, f"{idle_bytes} bytes crossed while idle with SFTP.KEEPALIVE = 0"


def test_the_openssh_keepalive_is_the_shorter_of_keepalive_and_a_third_of_the_timeout(sshd, proxy, tmp_path):
    connection = open_connection(sshd, proxy, tmp_path, "openssh", keepalive=30, timeout=25)
    command = connection._command(25)
    assert "ServerAliveInterval=8" in command and "ServerAliveCountMax=3" in command
    connection = open_connection(sshd, proxy, tmp_path, "openssh", keepalive=2, timeout=25)
    assert "ServerAliveInterval=2" in connection._command(25)
    connection = open_connection(sshd, proxy, tmp_path, "openssh", keepalive=0, timeout=25)
    assert "ServerAliveInterval=8" in connection._command(25)  # still how a dead connection is noticed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_connection_lost_while_idle_is_opened_again_once(sshd, proxy, tmp_path, transport, caplog):
    """A NAT drops the idle login (reset): the first upload connects again and succeeds; a second loss is
    not repaired: that upload fails with exit 14's error."""
    with open_connection(sshd, proxy, tmp_path, transport, keepalive=0) as connection:
        proxy.reset_connections()
        wait_until_lost(connection)
        connection.upload(io.BytesIO(b"after the loss"), "export_1.zip")
        assert "was lost while idle; connecting again" in caplog.text
        assert (sshd.folder(connection.folder) / "export_1.zip").read_bytes() == b"after the loss"
        proxy.reset_connections()
        wait_until_lost(connection)
        with pytest.raises(SftpError) as failure:
            connection.upload(io.BytesIO(b"second loss"), "export_2.zip")
        assert failure.value.exit_code == 14
    assert sorted(os.listdir(sshd.folder(connection.folder))) == ["export_1.zip"]


def wait_until_lost(connection: SftpConnection) -> None:
    """Wait until the client side has seen the reset (paramiko's thread, or the ssh child, ends)."""
    from broker_sftp_uploader.sftp.paramiko_internals import connection_is_lost

    for _ in range(200):
        if connection_is_lost(connection._main.client):
            return
        time.sleep(0.05)
    pytest.fail("the client never noticed the reset")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_connection_is_not_opened_again_and_every_later_action_fails_at_once(sshd, proxy, tmp_path,
                                                                                   transport):
    """A request that times out kills the connection: the next upload, removal, listing and session
    fail at once with the first failure's message, and the temp name stays in the journal."""
    journal = PartialsJournal(tmp_path / "status.xml.partials")
    connection = open_connection(sshd, proxy, tmp_path, transport, keepalive=0, timeout=TIMEOUT)
    connection.journal = journal
    with connection:
        worker = connection.open_session()
        proxy.freeze_after(0)
        with pytest.raises(SftpError, match="failed: timed out"):
            connection.upload(io.BytesIO(b"x" * 100_000), "export_1.zip")
        started = time.monotonic()
        for action in (lambda: connection.upload(io.BytesIO(b"y"), "export_2.zip"),
                       lambda: connection.remove("export_3.zip"), connection.main.list_sizes,
                       lambda: worker.upload(io.BytesIO(b"z"), "export_4.zip"), connection.open_session):
            with pytest.raises(SftpError, match=r"the connection to .* was lost \(timed out\); not done"):
                action()
        assert time.monotonic() - started < TIMEOUT  # no request went out: none waited for an answer
        worker.close()
    next_run = PartialsJournal(journal.path)  # what the next run finds to remove
    assert [name.startswith(".export_1.zip.part-") for name in next_run.leftovers()] == [True]
    proxy.pass_through()

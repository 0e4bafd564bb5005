"""A broken or hostile broker can neither hold a run nor fill its memory (real HTTP, the emulator)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from broker_sftp_uploader.broker.client import MAX_XML_BYTES, BrokerClient
from broker_sftp_uploader.errors import BrokerError
from test_resources import broker_actors as actors
from test_resources.broker_actors import ADMIN_KEY

FILTERED = r"/broker/request/filtered"
STATUS = r"/broker/request/\d+/status"


def client(broker, **options) -> BrokerClient:
    options = {"call_timeout": 2.0, "export_timeout": 30.0, "retries": 3, "concurrency": 4,
               "sleep": lambda seconds: None, **options}
    return BrokerClient(broker.url, ADMIN_KEY, **options)


def timed(call):
    start = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        call()
    return time.monotonic() - start, str(caught.value)


@pytest.mark.parametrize("answer", ["silent", "trickle", "trickle_headers"])
def test_listing_that_never_completes_fails_within_the_call_timeout(broker, answer):
    broker.inject_hostile("GET", FILTERED, answer, delay=0.2, times=10)
    with client(broker) as api:
        elapsed, message = timed(lambda: api.list_tagged_request_ids("rki"))
    assert elapsed < 6, elapsed
    assert "did not answer GET /broker/request/filtered within 2 s" in message


def test_status_call_that_trickles_fails_within_the_call_timeout(broker):
    request_id = actors.publish_completed(broker.url)
    broker.inject_hostile("GET", STATUS, "trickle", delay=0.1, times=10)
    with client(broker) as api:
        elapsed, message = timed(lambda: api.get_completion(request_id))
    assert elapsed < 6, elapsed
    assert "did not answer" in message


def test_run_deadline_caps_every_call(broker):
    broker.inject_hostile("GET", FILTERED, "trickle", delay=0.2)
    with client(broker, call_timeout=60, run_deadline=time.monotonic() + 1.5) as api:
        elapsed, message = timed(lambda: api.list_tagged_request_ids("rki"))
    assert elapsed < 5, elapsed
    assert "did not answer" in message


@pytest.mark.parametrize("answer", ["huge", "gzip_bomb", "endless"])
def test_oversized_answer_is_refused(broker, answer):
    broker.inject_hostile("GET", FILTERED, answer, size=64 * 1024 * 1024)
    with client(broker, call_timeout=30) as api:
        _, message = timed(lambda: api.list_tagged_request_ids("rki"))
    assert f"larger than {MAX_XML_BYTES // 1048576} MiB" in message


def test_transient_gateway_errors_are_retried_with_backoff(broker):
    request_id = actors.publish_completed(broker.url)
    broker.inject_fault("GET", STATUS, status=503, times=3)
    waits = []
    with client(broker, sleep=waits.append, retries=3, retry_backoff=0.5, call_timeout=30) as api:
        assert api.get_completion(request_id) == "1.0"
    assert sum(1 for call in broker.requests_log if call.path.endswith("/status")) == 4
    # urllib3's schedule: the first retry at once, then 0.5 s * 2**n plus up to 0.5 s of jitter
    assert len(waits) == 2
    assert 1.0 <= waits[0] <= 1.5 and 2.0 <= waits[1] <= 2.5, waits


def test_retries_stop_when_exhausted(broker):
    broker.inject_fault("GET", FILTERED, status=502, times=10)
    with client(broker, retries=2) as api:
        _, message = timed(lambda: api.list_tagged_request_ids("rki"))
    assert "broker answered 502 to GET /broker/request/filtered" in message
    assert sum(1 for call in broker.requests_log if call.path.endswith("/filtered")) == 3


def test_export_is_never_retried(broker):
    request_id = actors.publish_completed(broker.url)
    broker.inject_fault("POST", r"/broker/export/", status=503, times=5)
    with client(broker) as api:
        _, message = timed(lambda: api.open_result(request_id))
    assert "503" in message
    assert sum(1 for call in broker.requests_log if call.path.startswith("/broker/export/")) == 1


def test_download_that_stalls_is_given_up(broker):
    request_id = actors.publish_completed(broker.url)
    broker.inject_fault("GET", r"/broker/download/", delay=0.0, truncate_after=10)
    with client(broker) as api, api.open_result(request_id) as result, \
            pytest.raises(BrokerError, match="broke off|incomplete"):
        result.read()


def test_download_past_the_run_deadline_is_cut(broker):
    request_id = actors.publish_completed(broker.url)
    broker.inject_hostile("GET", r"/broker/download/", "trickle", delay=0.05)
    with client(broker, run_deadline=time.monotonic() + 1.5) as api:
        start = time.monotonic()
        with api.open_result(request_id) as result, pytest.raises(BrokerError, match="time limit"):
            while result.read(1024):
                pass
    assert time.monotonic() - start < 5


def test_close_cuts_a_download_in_progress(broker):
    """What a run does when it stops (Ctrl-C, SIGTERM, the run's time limit) while downloads trickle."""
    request_id = actors.publish_completed(broker.url)
    broker.inject_hostile("GET", r"/broker/download/", "trickle", delay=0.05)
    with client(broker, call_timeout=30) as api, api.open_result(request_id) as result:
        closer = threading.Timer(0.5, api.close)
        closer.start()
        start = time.monotonic()
        with pytest.raises(BrokerError, match=f"download of request {request_id} was stopped after "
                                              r"\d+ bytes: the run is ending"):
            while result.read(1024):
                pass
        closer.join()
    assert time.monotonic() - start < 10  # the trickle would go on for 14 hours


# ---- the whole CLI, as cron runs it: exit code, message, time and peak memory -----------------------

def run_cli(workspace, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `sync` as cron would and return (result, seconds)."""
    start = time.monotonic()
    result = workspace.sync(*extra)
    return result, time.monotonic() - start


def run_measured(workspace) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `sync` in a child that reports the peak RSS of its own address space at exit.

    VmHWM, not ru_maxrss: the latter keeps what the forking parent (pytest) had resident.
    """
    probe = (
        "import atexit, re, runpy, sys\n"
        "def report():\n"
        "    status = open('/proc/self/status').read()\n"
        "    sys.stderr.write('PEAK_RSS_KIB=%s\\n' % re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
        "atexit.register(report)\n"
        "sys.argv = ['broker-sftp-uploader', 'sync', '--config', sys.argv[1]]\n"
        "runpy.run_module('broker_sftp_uploader', run_name='__main__')\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", probe, str(workspace.config_path)], capture_output=True,
                            text=True, timeout=120, cwd=workspace.root, check=False)
    elapsed = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    peak = int(lines[-1].split("=")[1]) / 1024
    result.stderr = "\n".join(lines[:-1]) + "\n"
    return result, elapsed, peak


@pytest.mark.parametrize("answer,size", [("huge", 200 * 1024 * 1024), ("gzip_bomb", 1024 * 1024 * 1024),
                                         ("endless", 0)])
def test_sync_survives_a_flooding_broker_with_little_memory(workspace, broker, answer, size):
    broker.inject_hostile("GET", FILTERED, answer, size=size)
    result, _, peak = run_measured(workspace)
    assert result.returncode == 13, result.stderr
    assert "larger than 8 MiB" in result.stderr
    assert peak < 100, f"peak RSS {peak:.0f} MiB"
    assert not workspace.ledger.exists()


def test_sync_with_a_silent_broker_exits_13_naming_the_limit(workspace, broker):
    workspace.rewrite_config(f'API_KEY = "{ADMIN_KEY}"', f'API_KEY = "{ADMIN_KEY}"\nCALL_TIMEOUT = 3')
    actors.publish_completed(broker.url)
    broker.inject_hostile("GET", STATUS, "silent", times=10)
    result, elapsed = run_cli(workspace)
    assert result.returncode == 13, result.stderr
    assert "did not answer GET /broker/request/0/status within 3 s" in result.stderr
    assert elapsed < 15
    assert not workspace.ledger.exists()

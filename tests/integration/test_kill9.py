"""Crash consistency: ``kill -9`` of a sync at 20 moments, then a normal run repairs everything.

Each moment starts from the same state: the server holds A, B and E; on the broker A was deleted, B's
completion changed, and a large new C and a small new D appeared (see test_resources/crash_scenario.py).
The sync is killed at a fraction of the measured length of an uninterrupted run, from its very start
to just past its end. After a normal run the ledger, the server's files and WORKING_DIR must be exactly
right, and a third run must change nothing. Each failing moment lists all its violations.

The broker and the starting state are built once per module (the broker's state never changes during
the runs; every moment gets its own WORKING_DIR and remote folder, restored from a snapshot).
"""

from __future__ import annotations

import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_sftp_uploader.crypto import generate_key_file
from test_resources.broker_emulator import BrokerEmulator
from test_resources.crash_scenario import (
    ALLOWED_WORKING_FILES,
    JOURNAL_FILE_NAMES,
    BundleContent,
    Outcome,
    ScenarioRequests,
    Site,
    SiteSnapshot,
    broker_completion,
    bundle_content,
    crash_and_recover,
    fetch_bundle,
    first_run,
    starting_state,
)
from test_resources.broker_actors import write_incompressible_file
from test_resources.sshd import SshdServer
from tests.conftest import write_config

# Size of C's result, incompressible: its export and upload take about half of a run of 1.4-2 s on
# the 2-core VM, so many moments fall inside them. 48 MiB made a run 3 s and this module 2 minutes.
LARGE_RESULT_MIB = 24
# Kill moments as fractions of the measured uninterrupted run: from 2 % (the interpreter is still
# starting) to 116 %, as runs vary by 10-20 % around the measurement.
KILL_FRACTIONS = tuple(round(0.02 + index * 0.06, 3) for index in range(20))
# Uninterrupted runs measured; their median is the run length (single runs were off by up to 50 %).
TIMED_RUNS = 3
# Values of SFTP.PARALLEL_UPLOADS; None leaves it out of the config: the default, 8 uploads at once, so
# C and D are in flight together and the guarantees are checked with concurrency on.
CONCURRENCY_SETTINGS: tuple[int | None, ...] = (None,)
CONCURRENCY_KEY = "PARALLEL_UPLOADS"


@dataclass
class Scenario:
    """The shared broker and starting state, and what an uninterrupted run did."""

    broker_url: str
    sshd: SshdServer
    key_path: Path
    concurrency: int | None
    snapshot: SiteSnapshot
    ids: ScenarioRequests
    references: dict[str, BundleContent]
    clean: Outcome | None = None
    run_seconds: tuple[float, ...] = ()

    @property
    def duration(self) -> float:
        """The median length of the uninterrupted runs."""
        return statistics.median(self.run_seconds)

    def new_site(self, root: Path, label: str) -> Site:
        """A new installation under ``root`` with its own remote folder, in the original config format."""
        folder = f"kill9-{label}-{os.urandom(3).hex()}"
        remote = self.sshd.folder(folder)
        working_dir = root / "work"
        working_dir.mkdir(parents=True)
        concurrency = [] if self.concurrency is None else [f"{CONCURRENCY_KEY} = {self.concurrency}"]
        config_path = root / "settings.toml"
        write_config(config_path, self.broker_url, self.sshd, self.sshd.password_user, self.sshd.password, folder,
                     key_file=self.key_path, sftp_lines=concurrency)
        return Site(root=root, config_path=config_path, working_dir=working_dir, remote=remote,
                    key_path=self.key_path)


@pytest.fixture(scope="module", params=CONCURRENCY_SETTINGS,
                ids=lambda value: f"concurrency-{value or 'default'}")
def scenario(request, sshd, tmp_path_factory):
    """Build the starting state once, check an uninterrupted run of the scenario, and time a few."""
    base = tmp_path_factory.mktemp("kill9")
    key_path = base / "rki.key"
    generate_key_file(key_path)
    # Short-lived downloads: every run exports C again, and expired exports are removed from disk.
    with BrokerEmulator(data_dir=base / "broker-data", download_lifetime=60.0) as broker:
        scenario = Scenario(broker.url, sshd, key_path, request.param, None, None, {})
        large_result = base / "large-result.bin"
        write_incompressible_file(large_result, LARGE_RESULT_MIB)
        scenario.snapshot, scenario.ids = starting_state(
            broker.url, scenario.new_site(base / "template", "template"), large_result)
        reported = {request_id: broker_completion(broker.url, request_id)
                    for request_id in scenario.ids.expected_completions()}
        assert reported == scenario.ids.expected_completions(), "the broker reports other completions"
        scenario.references = {request_id: bundle_content(fetch_bundle(broker.url, request_id))
                               for request_id in scenario.ids.expected_completions()}

        clean = scenario.new_site(base / "clean", "clean")
        scenario.snapshot.restore(clean)
        scenario.clean = crash_and_recover(clean, scenario.ids, scenario.references, offset=None)
        shutil.rmtree(clean.remote)
        scenario.run_seconds = (scenario.clean.first_run_seconds,) + tuple(
            _time_uninterrupted_run(scenario, base / f"timed-{index}", f"timed{index}")
            for index in range(TIMED_RUNS - 1))
        yield scenario
    # pytest keeps old base temp folders: drop the bulky files (the result and leftover exports).
    large_result.unlink()
    shutil.rmtree(base / "broker-data", ignore_errors=True)


def _time_uninterrupted_run(scenario: Scenario, root: Path, label: str) -> float:
    """Seconds an uninterrupted run takes (its result is what the checked uninterrupted run shows)."""
    site = scenario.new_site(root, label)
    scenario.snapshot.restore(site)
    try:
        outcome = first_run(site, offset=None)
    finally:
        shutil.rmtree(site.remote, ignore_errors=True)
    return outcome.first_run_seconds


def _fail_on_violations(outcome: Outcome, what: str) -> None:
    """Fail with every violation of this moment, and the state the first run left, in one message."""
    print(f"{what}: {outcome.summary()}; violations: {len(outcome.violations)}")
    if outcome.violations:
        lines = [f"{what}; {outcome.summary()}"] + [f"  - {violation}" for violation in outcome.violations]
        pytest.fail("\n".join(lines), pytrace=False)


def test_uninterrupted_run_of_the_scenario_meets_every_check(scenario):
    clean = scenario.clean
    assert not clean.killed
    _fail_on_violations(clean, "uninterrupted run")
    # The allowed set of WORKING_DIR is what a clean run leaves, and nothing more.
    assert set(clean.working_files) <= ALLOWED_WORKING_FILES | JOURNAL_FILE_NAMES, clean.working_files


@pytest.mark.parametrize("moment", range(len(KILL_FRACTIONS)),
                         ids=[f"at-{round(fraction * 100)}pct" for fraction in KILL_FRACTIONS])
def test_kill9_at_any_moment_is_repaired_by_the_next_run(scenario, moment, tmp_path):
    offset = KILL_FRACTIONS[moment] * scenario.duration
    site = scenario.new_site(tmp_path, f"m{moment:02d}")
    scenario.snapshot.restore(site)
    try:
        outcome = crash_and_recover(site, scenario.ids, scenario.references, offset)
    finally:
        shutil.rmtree(site.remote, ignore_errors=True)  # C's file alone is tens of MiB
    runs = ", ".join(f"{seconds:.2f}" for seconds in scenario.run_seconds)
    _fail_on_violations(outcome, f"SIGKILL at {offset:.2f} s of a {scenario.duration:.2f} s run "
                                 f"(median of {runs})")

"""The ``kill -9`` scenario of issue 6: a sync killed at a chosen moment, then what must hold afterwards.

The server holds requests A, B and E. On the broker A is then deleted, a second node reports on B (its
completion changes), E stays as it was, and a large new request C and a small new one D appear. A
``sync`` doing all that is killed with SIGKILL at some moment; a normal run follows, then a third run.
``crash_and_recover`` does one such moment on a ``Site`` and returns every violation it finds, each as
``"[class] detail"``, so a failing moment names all its problems at once.

Everything is real: the CLI runs as a separate process against the broker emulator and OpenSSH sshd.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests
from cryptography.fernet import Fernet, InvalidToken
from lxml import etree

from test_resources import broker_actors as actors

TAG = "rki"
# What a run may leave in WORKING_DIR besides the ledger's journal of remote temp names; a clean run
# leaves exactly these (checked by the uninterrupted run). Anything else is a leftover temp file.
ALLOWED_WORKING_FILES = frozenset({"status.xml", "status.xml.lock", "known_hosts",
                                   "status.xml.uploaded-sha256", "last-run.json"})
# The journal of in-flight remote temp names (broker_sftp_uploader/journal.py): a run removes it once
# it is empty, so after a completed run it must be absent or empty.
JOURNAL_FILE_NAMES = frozenset({"status.xml.partials"})
LOCK_FILE_NAME = "status.xml.lock"
# Rewritten by every run (its report), so not part of what the third run must leave unchanged.
LAST_RUN_NAME = "last-run.json"
LEDGER_NAME = "status.xml"
# How the uploader hides a file in flight on the server: ".<name>.part-<hex>".
_PARTIAL_UPLOAD = re.compile(r"\..+\.part-.*")
RUN_TIMEOUT = 120.0

FileState = tuple[int, int, int]  # size, mtime in ns, inode


@dataclass(frozen=True)
class ScenarioRequests:
    """The request ids of the scenario and the completion the broker reports for each listed one."""

    deleted: str    # A: uploaded, then deleted on the broker
    changed: str    # B: uploaded at 1.0, then a second node reports "retrieved": 0.5
    unchanged: str  # E: uploaded, untouched since
    large: str = ""  # C: new, large result
    small: str = ""  # D: new, small result

    def expected_completions(self) -> dict[str, str]:
        """Completion of every listed request, as the broker's status rows give it (completed / rows)."""
        return {self.changed: "0.5", self.unchanged: "1.0", self.large: "1.0", self.small: "1.0"}

    def remote_name(self, request_id: str) -> str:
        return f"export_{request_id}.zip"


def prepare_initial_requests(url: str) -> ScenarioRequests:
    """Given a fresh broker, create A, B and E, each completed by node 1 with a small result."""
    deleted = actors.publish_completed(url, TAG, result=b"a;b\n1;2\n")
    changed = actors.publish_completed(url, TAG, result=b"c;d\n3;4\n")
    unchanged = actors.publish_completed(url, TAG, result=b"e;f\n5;6\n")
    return ScenarioRequests(deleted=deleted, changed=changed, unchanged=unchanged)


def change_broker(url: str, initial: ScenarioRequests, large_result: Path) -> ScenarioRequests:
    """Delete A, let node 2 report on B, add C with ``large_result`` and D; return all ids."""
    actors.delete_request(url, initial.deleted)
    actors.post_status(url, actors.NODE2_KEY, initial.changed, "retrieved")
    large = actors.publish_completed(url, TAG, result=large_result)
    small = actors.publish_completed(url, TAG, result=b"g;h\n7;8\n")
    return ScenarioRequests(initial.deleted, initial.changed, initial.unchanged, large, small)


def starting_state(url: str, template: Site, large_result: Path) -> tuple[SiteSnapshot, ScenarioRequests]:
    """On a fresh broker: create A, B and E, sync them with ``template`` and save its state (its remote
    folder is then removed), then change the broker, with ``large_result`` as C's result.

    :returns: the saved state, and the ids of all the requests.
    """
    initial = prepare_initial_requests(url)
    first = template.sync()
    assert first.returncode == 0, f"the initial sync failed: {first.stderr}"
    snapshot = SiteSnapshot.take(template)
    shutil.rmtree(template.remote)
    return snapshot, change_broker(url, initial, large_result)


def broker_completion(url: str, request_id: str) -> str:
    """The completion the broker reports for a request: rows with ``completed`` / all node rows, as
    the original script formats it (``"0.0"`` without rows)."""
    headers = {"Authorization": f"Bearer {actors.ADMIN_KEY}", "Accept": "application/xml"}
    response = requests.get(f"{url}/broker/request/{request_id}/status", headers=headers,
                            timeout=actors.TIMEOUT)
    response.raise_for_status()
    rows = etree.fromstring(response.content).findall(f"{{{actors.NS}}}request-status-info")
    completed = sum(1 for row in rows if row.find(f"{{{actors.NS}}}completed") is not None)
    return str(round(completed / len(rows), 2)) if rows else "0.0"


@dataclass(frozen=True)
class BundleContent:
    """A zip's comment and its entries in order, each as (name, size, SHA-256 of the bytes)."""

    comment: bytes
    entries: tuple[tuple[str, int, str], ...]


def bundle_content(data: bytes) -> BundleContent:
    """The content of a zip, independent of its timestamps and compression.

    :raises zipfile.BadZipFile: ``data`` is not a zip.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        entries = []
        for info in bundle.infolist():
            digest = hashlib.sha256()
            with bundle.open(info) as entry:
                while chunk := entry.read(1024 * 1024):
                    digest.update(chunk)
            entries.append((info.filename, info.file_size, digest.hexdigest()))
        return BundleContent(bundle.comment, tuple(entries))


def fetch_bundle(url: str, request_id: str) -> bytes:
    """Export a request's bundle on the broker and download it, as the uploader does."""
    headers = {"Authorization": f"Bearer {actors.ADMIN_KEY}", "Accept": "text/plain"}
    export = requests.post(f"{url}/broker/export/request-bundle/{request_id}", headers=headers,
                           timeout=actors.TIMEOUT)
    export.raise_for_status()
    download = requests.get(f"{url}/broker/download/{export.text.strip()}", timeout=actors.TIMEOUT)
    download.raise_for_status()
    return download.content


def file_states(folder: Path, skip: frozenset[str] = frozenset()) -> dict[str, FileState]:
    """Every entry of ``folder`` (dotfiles included) by name: size, mtime and inode."""
    states = {}
    for entry in os.scandir(folder):
        if entry.name not in skip:
            stat = entry.stat(follow_symlinks=False)
            states[entry.name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return states


@dataclass
class Site:
    """One uploader installation: its root folder, config, WORKING_DIR and the remote folder on disk."""

    root: Path
    config_path: Path
    working_dir: Path
    remote: Path
    key_path: Path

    @property
    def ledger(self) -> Path:
        return self.working_dir / LEDGER_NAME

    def sync_command(self) -> list[str]:
        return [sys.executable, "-m", "broker_sftp_uploader", "sync", "--config", str(self.config_path)]

    def start_sync(self) -> subprocess.Popen:
        """Start ``sync`` as cron would: a separate process, environment inherited."""
        return subprocess.Popen(self.sync_command(), cwd=self.root, env=dict(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sync(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.sync_command(), cwd=self.root, env=dict(os.environ), check=False,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)

    def describe(self) -> str:
        """The server's and WORKING_DIR's file names and the ledger's request ids, for messages."""
        return (f"server {sorted(os.listdir(self.remote))}, "
                f"WORKING_DIR {sorted(os.listdir(self.working_dir))}, ledger {_ledger_summary(self.ledger)}")


def _ledger_summary(path: Path) -> str:
    try:
        root = etree.parse(str(path)).getroot()
    except OSError:
        return "absent"
    except etree.XMLSyntaxError as error:
        return f"unparsable ({error})"
    parts = []
    for element in root.iter("request-status"):
        state = "deleted" if element.find("deleted") is not None else element.findtext("completion")
        parts.append(f"{element.findtext('id')}:{state}")
    return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class SavedFile:
    name: str
    data: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True)
class SiteSnapshot:
    """The files of a site's WORKING_DIR and remote folder, with owners, modes and times."""

    working: tuple[SavedFile, ...]
    remote: tuple[SavedFile, ...]

    @classmethod
    def take(cls, site: Site) -> SiteSnapshot:
        return cls(_save(site.working_dir, skip={LOCK_FILE_NAME, LAST_RUN_NAME}), _save(site.remote, skip=set()))

    def restore(self, site: Site) -> None:
        """Put the saved files into ``site``'s (empty) folders as they were."""
        for folder, files in ((site.working_dir, self.working), (site.remote, self.remote)):
            for saved in files:
                path = folder / saved.name
                path.write_bytes(saved.data)
                os.chown(path, saved.uid, saved.gid)
                path.chmod(saved.mode)
                os.utime(path, ns=(saved.mtime_ns, saved.mtime_ns))


def _save(folder: Path, skip: set[str]) -> tuple[SavedFile, ...]:
    saved = []
    for path in sorted(folder.iterdir()):
        if path.name not in skip:
            stat = path.stat()
            saved.append(SavedFile(path.name, path.read_bytes(), stat.st_mode & 0o7777, stat.st_uid,
                                   stat.st_gid, stat.st_mtime_ns))
    return tuple(saved)


@dataclass
class Outcome:
    """What one moment did: how the first run ended, the state it left, and every violation found."""

    offset: float | None
    first_run_seconds: float
    killed: bool
    after_first_run: str
    violations: list[str] = field(default_factory=list)
    working_files: list[str] = field(default_factory=list)
    rerun_seconds: float = 0.0

    def summary(self) -> str:
        """One line: when the first run ended, what it left, how long the repair took."""
        ended = "killed" if self.killed else "finished"
        return (f"first run {ended} after {self.first_run_seconds:.2f} s; left {self.after_first_run}; "
                f"rerun took {self.rerun_seconds:.2f} s")


def crash_and_recover(site: Site, ids: ScenarioRequests, references: dict[str, BundleContent],
                      offset: float | None) -> Outcome:
    """Given a site in the starting state, run ``sync`` and SIGKILL it ``offset`` seconds after its
    start (None: let it finish), then run it normally and a third time; return the outcome with
    every violation found."""
    untouched_before = file_states(site.remote).get(ids.remote_name(ids.unchanged))
    outcome = first_run(site, offset)
    rerun_started = time.monotonic()
    rerun = site.sync()
    outcome.rerun_seconds = time.monotonic() - rerun_started
    if rerun.returncode != 0:
        outcome.violations.append(f"[rerun-exit] the run after the kill exited {rerun.returncode}: "
                                  f"{_tail(rerun.stderr)}")
    outcome.working_files = sorted(os.listdir(site.working_dir))
    # Before the third run starts: that run saves its own report (last-run.json) through a temp file.
    outcome.violations += check_working_dir(site)
    before_third = _state_for_third_run(site)
    # The third run only reads, so the content checks overlap with it (2 cores; keeps the test short).
    third = site.start_sync()
    try:
        outcome.violations += check_ledger(site, ids)
        outcome.violations += check_remote_files(site, ids, references, untouched_before)
    finally:
        _, third_stderr = third.communicate(timeout=RUN_TIMEOUT)
    if third.returncode != 0:
        outcome.violations.append(f"[third-run-exit] the third run exited {third.returncode}: "
                                  f"{_tail(third_stderr)}")
    outcome.violations += _changes(before_third, _state_for_third_run(site))
    return outcome


def first_run(site: Site, offset: float | None) -> Outcome:
    """Run ``sync`` on ``site`` and SIGKILL it ``offset`` seconds after its start (None: let it end)."""
    process = site.start_sync()
    started = time.monotonic()
    try:
        process.wait(timeout=offset)
    except subprocess.TimeoutExpired:
        process.kill()  # SIGKILL: no handler, no cleanup, like power loss or the OOM killer
    _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    killed = process.returncode == -9
    outcome = Outcome(offset, time.monotonic() - started, killed, site.describe())
    if not killed and process.returncode != 0:
        outcome.violations.append(f"[first-run-exit] the run that was not killed exited "
                                  f"{process.returncode}: {_tail(stderr)}")
    return outcome


def _state_for_third_run(site: Site) -> dict[str, FileState | bytes | None]:
    """What the third run must not change: every file on the server and in WORKING_DIR (but the
    lock file, which holds the pid of the last run, and that run's report), and the ledger's bytes."""
    state: dict[str, FileState | bytes | None] = {
        f"{name} on the server": value for name, value in file_states(site.remote).items()}
    state.update({f"{name} in WORKING_DIR": value for name, value in
                  file_states(site.working_dir, skip=frozenset({LOCK_FILE_NAME, LAST_RUN_NAME})).items()})
    state["the ledger's bytes"] = _read(site.ledger)
    return state


def _changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    problems = [f"[third-run-changed] the third run added {name}"
                for name in sorted(after.keys() - before.keys())]
    problems += [f"[third-run-changed] the third run removed {name}"
                 for name in sorted(before.keys() - after.keys())]
    for name in sorted(before.keys() & after.keys()):
        if before[name] != after[name]:
            detail = ""
            if isinstance(after[name], tuple):
                detail = f" (size, mtime ns, inode {before[name]} -> {after[name]})"
            problems.append(f"[third-run-changed] the third run changed {name}{detail}")
    return problems


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def check_ledger(site: Site, ids: ScenarioRequests) -> list[str]:
    """The ledger parses, marks A deleted and lists B, C, D, E with the broker's completion."""
    try:
        root = etree.parse(str(site.ledger)).getroot()
    except (OSError, etree.XMLSyntaxError) as error:
        return [f"[ledger-parse] {site.ledger.name} does not parse: {error}"]
    entries = {element.findtext("id"): element for element in root.iter("request-status")}
    problems = []
    expected_ids = {ids.deleted, *ids.expected_completions()}
    if set(entries) != expected_ids:
        problems.append(f"[ledger-content] the ledger lists requests {sorted(entries)}, "
                        f"expected {sorted(expected_ids)}")
    deleted = entries.get(ids.deleted)
    if deleted is not None and deleted.find("deleted") is None:
        problems.append(f"[ledger-content] request {ids.deleted} was deleted on the broker but its ledger "
                        "entry has no <deleted>")
    for request_id, completion in ids.expected_completions().items():
        element = entries.get(request_id)
        if element is None:
            continue
        if element.find("deleted") is not None:
            problems.append(f"[ledger-content] request {request_id} is listed by the broker but "
                            "marked deleted")
        if element.findtext("completion") != completion:
            problems.append(f"[ledger-content] request {request_id} has completion "
                            f"{element.findtext('completion')!r} in the ledger, the broker says "
                            f"{completion!r}")
    return problems


def check_remote_files(site: Site, ids: ScenarioRequests, references: dict[str, BundleContent],
                       untouched_before: FileState | None) -> list[str]:
    """Exactly the listed requests' files and status.xml are on the server, each one right."""
    names = set(os.listdir(site.remote))
    expected = {ids.remote_name(request_id) for request_id in ids.expected_completions()} | {LEDGER_NAME}
    problems = []
    for name in sorted(names - expected):
        if name == ids.remote_name(ids.deleted):
            problems.append(f"[deleted-file-kept] {name} of the deleted request {ids.deleted} is still on "
                            "the server")
        elif _PARTIAL_UPLOAD.fullmatch(name):
            problems.append(f"[remote-partial] partial upload {name} left on the server")
        else:
            problems.append(f"[remote-extra] unexpected file {name} on the server")
    problems += [f"[remote-missing] {name} is missing on the server" for name in sorted(expected - names)]
    key = site.key_path.read_bytes().strip()
    for request_id in ids.expected_completions():
        name = ids.remote_name(request_id)
        if name in names:
            problems += _check_bundle(site.remote / name, key, references[request_id])
    untouched = file_states(site.remote).get(ids.remote_name(ids.unchanged))
    if untouched_before is not None and untouched is not None and untouched != untouched_before:
        problems.append(f"[unchanged-rewritten] {ids.remote_name(ids.unchanged)} of the unchanged request "
                        f"{ids.unchanged} was rewritten")
    if LEDGER_NAME in names and _read(site.remote / LEDGER_NAME) != _read(site.ledger):
        problems.append("[status-xml-differs] the server's status.xml differs from the local ledger")
    return problems


def _check_bundle(path: Path, key: bytes, reference: BundleContent) -> list[str]:
    try:
        plain = Fernet(key).decrypt(path.read_bytes())
    except InvalidToken:
        return [f"[remote-content] {path.name} does not decrypt with the key (tampered or truncated)"]
    try:
        content = bundle_content(plain)
    except zipfile.BadZipFile:
        return [f"[remote-content] {path.name} decrypts to something that is not a zip"]
    if content == reference:
        return []
    names, expected_names = [entry[0] for entry in content.entries], [entry[0] for entry in reference.entries]
    if names != expected_names:
        difference = f"entries {names}, the broker's bundle has {expected_names}"
    elif content.comment != reference.comment:
        difference = f"zip comment {content.comment!r}, the broker's bundle has {reference.comment!r}"
    else:
        difference = "different bytes in " + ", ".join(
            f"{got[0]} ({got[1]} bytes, the broker's has {want[1]})"
            for got, want in zip(content.entries, reference.entries) if got != want)
    return [f"[remote-content] {path.name} decrypts to a bundle unlike the broker's: {difference}"]


def check_working_dir(site: Site) -> list[str]:
    """Only the allowed files are in WORKING_DIR, and the journal of remote temp names is empty."""
    problems = []
    for name in sorted(os.listdir(site.working_dir)):
        path = site.working_dir / name
        if name in JOURNAL_FILE_NAMES:
            if path.read_bytes().strip():
                problems.append(f"[journal-not-empty] the journal {name} still lists remote temp files: "
                                f"{path.read_text(errors='replace').strip()[:200]!r}")
        elif name not in ALLOWED_WORKING_FILES:
            problems.append(f"[working-dir-leftover] unexpected file {name} in WORKING_DIR")
    return problems

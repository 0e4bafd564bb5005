"""The ``check`` command: a preflight of the whole set-up that changes nothing.

Each step (``STEPS``) gives one ``Finding`` (ok, warning, failed, info or skipped) with what is wrong
and how to fix it. A step that does not depend on a failed one still runs (a broker that is down
does not stop the SFTP checks). The exit code is that of the first failed step.

Nothing is written: not the ledger, not the lock file (a held lock is only tested), not the partials
journal, not known_hosts (the SFTP login uses a temporary copy of it, so a new host key is shown
and not recorded). On the server, the folder probe takes a sync's path: a hidden file is written, then
uploaded over by ``SftpSession.upload`` (temp name, the rename method a sync would choose, the check
of what the rename left), and both are removed.

The login that records no host key is ``sftp/readonly_login.py``, shared with ``status --remote``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import posixpath
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.config import Config, SftpSettings, load_config
from broker_sftp_uploader.crypto import key_fingerprint, load_keys
from broker_sftp_uploader.errors import (
    EXIT_BROKER,
    EXIT_LEDGER,
    EXIT_OK,
    EXIT_SFTP,
    BrokerError,
    ConfigError,
    SftpError,
    UploaderError,
)
from broker_sftp_uploader.interrupts import deferred
from broker_sftp_uploader.state.ledger import Ledger
from broker_sftp_uploader.state.lock import lock_holder
from broker_sftp_uploader.sftp.readonly_login import sftp_without_recording
from broker_sftp_uploader.sftp.session import FAILURES, METHOD_DELETE_THEN_RENAME, SftpSession, reason
from broker_sftp_uploader.sftp.ssh_keys import load_known_hosts, load_private_key, ssh_fingerprint
from broker_sftp_uploader.broker.client import broker_client

logger = logging.getLogger(__name__)

CHECK_VERSION = 1  # of the JSON document
OK, WARNING, FAILED, INFO, SKIPPED = "ok", "warning", "failed", "info", "skipped"
PROBE_CONTENT = b"broker-sftp-uploader check: a probe of the folder's permissions, removed at once\n"

# Every step, in the order it runs and reports, with a note on what it checks where the name does not
# say it all. check's --help lists them from here; each finding below is named by one of them.
STEPS: dict[str, str] = {
    "config": "",
    "fernet key": "",
    "ssh key": "",
    "broker": "",
    "api key": "",
    "requests": "how many REQUESTS.TAG selects; none is a warning",
    "sftp server": "host key new, known or changed",
    "sftp login": "",
    "sftp folder": "a hidden probe file is written, replaced as a sync replaces files, and removed",
    "ledger": "",
    "lock": "is a run going on?",
}
_SFTP_STEPS = ("sftp server", "sftp login", "sftp folder")


@dataclass(frozen=True)
class Finding:
    """The outcome of one step; ``exit_code`` is set for a failed one."""

    name: str
    outcome: str  # OK, WARNING, FAILED, INFO or SKIPPED ("status" in the JSON form)
    message: str
    exit_code: int = EXIT_OK
    details: dict | None = None  # more facts for the JSON form ("details"), e.g. the SFTP server's


@dataclass
class CheckReport:
    """Every step's finding, in order."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The code of the first failed step; 0 when none failed (warnings allowed)."""
        return next((finding.exit_code for finding in self.findings if finding.outcome == FAILED), EXIT_OK)

    def document(self) -> dict:
        """The JSON form: ``{"version": 1, "exit_code": N, "checks": [{"name", "status", "message"}]}``,
        a check with more facts also with ``"details"`` (the "sftp folder" check: the server's software,
        SFTP version, extensions and rename method)."""
        return {"version": CHECK_VERSION, "exit_code": self.exit_code,
                "checks": [{"name": finding.name, "status": finding.outcome, "message": finding.message,
                            **({"details": finding.details} if finding.details is not None else {})}
                           for finding in self.findings]}

    def lines(self) -> list[str]:
        """One line per step, then a summary line."""
        width = max((len(finding.name) for finding in self.findings), default=0)
        lines = [f"{finding.name:<{width}}  {_shown_outcome(finding.outcome):<7}  {finding.message}"
                 for finding in self.findings]
        failed = [finding.name for finding in self.findings if finding.outcome == FAILED]
        warnings = sum(1 for finding in self.findings if finding.outcome == WARNING)
        noted = f", {warnings} warning(s)" if warnings else ""
        if failed:
            lines.append(f"{len(failed)} check(s) failed ({', '.join(failed)}){noted}; "
                         f"exit code {self.exit_code}")
        else:
            lines.append(f"all checks passed{noted}")
        return lines


def _shown_outcome(outcome: str) -> str:
    return "FAILED" if outcome == FAILED else outcome


def run_checks(config_path: Path) -> CheckReport:
    """Given the config file, check the whole set-up without changing anything; return the findings.

    :raises KeyboardInterrupt: the operator stopped it (the probe file is removed first).
    """
    report = CheckReport()
    config_finding, config = _step("config", lambda: _check_config(config_path))
    report.findings.append(config_finding)
    if config is None:
        report.findings += [Finding(name, SKIPPED, "needs a valid config") for name in list(STEPS)[1:]]
        return report
    deadline = config.run_deadline()
    report.findings.append(_step("fernet key", lambda: _check_fernet_key(config))[0])
    ssh_key = _step("ssh key", lambda: _check_ssh_key(config))[0]
    report.findings.append(ssh_key)
    report.findings += _check_broker(config, deadline)
    if ssh_key.outcome == FAILED:
        report.findings += [Finding(name, SKIPPED, "needs a usable SSH private key")
                            for name in _SFTP_STEPS]
    else:
        report.findings += _check_sftp(config, deadline)
    report.findings.append(_step("ledger", lambda: _check_ledger(config))[0])
    report.findings.append(_step("lock", lambda: _check_lock(config))[0])
    return report


def _step(name: str, work: Callable[[], tuple[Finding, object]]) -> tuple[Finding, object]:
    """Run one step: its ``UploaderError`` becomes a failed finding, and the warnings it logged are folded
    into its finding (an ok step with a warning becomes a warning) instead of going to stderr."""
    with _captured_warnings() as warnings:
        try:
            finding, value = work()
        except UploaderError as error:
            finding, value = Finding(name, FAILED, str(error), error.exit_code), None
    if warnings:
        outcome = WARNING if finding.outcome in (OK, INFO) else finding.outcome
        finding = dataclasses.replace(finding, outcome=outcome, message="; ".join([finding.message, *warnings]))
    return finding, value


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect the package's warnings logged meanwhile (and keep them off stderr)."""
    package = logging.getLogger("broker_sftp_uploader")
    collector = _WarningCollector()
    package.addHandler(collector)
    propagate, package.propagate = package.propagate, False
    try:
        yield collector.messages
    finally:
        package.propagate = propagate
        package.removeHandler(collector)


# --- config and keys ----------------------------------------------------------------------------------


def _check_config(path: Path) -> tuple[Finding, Config | None]:
    try:
        config = load_config(path)
    except ConfigError as error:
        return Finding("config", FAILED, str(error), error.exit_code), None
    return Finding("config", OK, f"{path} is valid"), config


def _check_fernet_key(config: Config) -> tuple[Finding, None]:
    keys = load_keys(config.key_path)
    more = f" (and {len(keys) - 1} older one(s) for decrypting)" if len(keys) > 1 else ""
    return Finding("fernet key", OK, f"{config.key_path}: uploads are encrypted with the key of fingerprint "
                                     f"{key_fingerprint(keys[0])}{more}"), None


def _check_ssh_key(config: Config) -> tuple[Finding, None]:
    settings = config.sftp
    if settings.private_key is None:
        return Finding("ssh key", SKIPPED, "no SFTP.PRIVATE_KEY configured (password login)"), None
    key = load_private_key(settings.private_key, settings.private_key_passphrase)
    return Finding("ssh key", OK, f"{settings.private_key}: {key.get_name()} {ssh_fingerprint(key)}"), None


# --- the broker ---------------------------------------------------------------------------------------


def _check_broker(config: Config, deadline: float) -> list[Finding]:
    """Steps "broker", "api key" and "requests"."""
    tag = config.broker.tag
    with broker_client(config, deadline) as broker:
        try:
            broker.check_status()
        except BrokerError as error:
            return [Finding("broker", FAILED, str(error), error.exit_code),
                    Finding("api key", SKIPPED, "needs the broker"),
                    Finding("requests", SKIPPED, "needs the broker")]
        reached = Finding("broker", OK, f"{config.broker.url} answers")
        try:
            ids = broker.list_tagged_request_ids(tag)
        except BrokerError as listing_error:
            return [reached, *_explain_refusal(broker, listing_error)]
    admin = Finding("api key", OK, "BROKER.API_KEY is an admin key")
    if not ids:
        none = Finding("requests", WARNING, f"no request on the broker is tagged {tag!r} (REQUESTS.TAG); "
                       "check the tag: until one is, a sync uploads nothing")
        return [reached, admin, none]
    return [reached, admin, Finding("requests", OK, f"{len(ids)} request(s) tagged {tag!r}")]


def _explain_refusal(broker: BrokerClient, listing_error: BrokerError) -> list[Finding]:
    """The "api key" and "requests" findings after the listing failed: was it the key, and which kind?"""
    try:
        role = broker.api_key_role()
    except BrokerError:
        role = None
    skipped = Finding("requests", SKIPPED, "needs an admin key")
    if role == "node":
        return [Finding("api key", FAILED, "BROKER.API_KEY is a node (hospital) key, not an admin key; "
                        "use the broker's admin API key (its DN has OU=admin)", EXIT_BROKER), skipped]
    if role == "unknown":
        return [Finding("api key", FAILED, "the broker does not know BROKER.API_KEY (401: unknown or "
                        "inactive key); check it against the broker's api-keys.properties", EXIT_BROKER),
                skipped]
    if role == "admin":
        return [Finding("api key", OK, "BROKER.API_KEY is an admin key"),
                Finding("requests", FAILED, str(listing_error), listing_error.exit_code)]
    return [Finding("api key", FAILED, str(listing_error), listing_error.exit_code), skipped]


# --- SFTP ---------------------------------------------------------------------------------------------


def _recorded_keys(settings: SftpSettings) -> str:
    """The host's keys in known_hosts, ``TYPE SHA256:…`` joined, or "" when there is none."""
    known = load_known_hosts(settings.known_hosts)
    name = settings.host if settings.port == 22 else f"[{settings.host}]:{settings.port}"
    found = known.host_keys.lookup(name) or {}
    return ", ".join(f"{key.get_name()} {ssh_fingerprint(key)}" for key in found.values())


def _is_login_refusal(error: UploaderError) -> bool:
    """True when the server was reached and its host key trusted, but it refused the login (both
    transports word this "SFTP login as …"); anything else stopped at the network, the known_hosts
    file or the host key."""
    return str(error).startswith("SFTP login as")


def _check_sftp(config: Config, deadline: float) -> list[Finding]:
    """Steps "sftp server" (reachable, host key new / known / changed), "sftp login" and "sftp folder"."""
    settings = config.sftp
    server = f"{settings.host}:{settings.port}"
    # The connection loads the private key again: its warnings are already in the "ssh key" step.
    with _captured_warnings(), sftp_without_recording(config, deadline) as visit:
        error = visit.error
        if error is not None and not _is_login_refusal(error):
            findings = [Finding("sftp server", FAILED, str(error), error.exit_code),
                        Finding("sftp login", SKIPPED, "needs the server, with a trusted host key")]
        else:
            findings = [_host_key_finding(settings, visit.new_host_keys, server)]
            if error is not None:
                findings.append(Finding("sftp login", FAILED, str(error), error.exit_code))
            else:
                findings.append(Finding("sftp login", OK,
                                        f"logged in as {settings.username} with {_methods(settings)}"))
        if visit.connection is None:
            findings.append(Finding("sftp folder", SKIPPED, "needs a login"))
        else:
            connection = visit.connection
            session = SftpSession(connection.main.client, settings.folder, connection.where,
                                  traits=connection.traits)
            findings.append(_probe_folder(session, settings, connection.where))
    return findings


def _host_key_finding(settings: SftpSettings, new_keys: tuple[str, ...], server: str) -> Finding:
    if new_keys:
        port = f"-p {settings.port} " if settings.port != 22 else ""
        return Finding("sftp server", WARNING,
                       f"{server} presented the host key {', '.join(new_keys)}, which is not yet recorded in "
                       f"{settings.known_hosts}; the first sync records it (check did not). Confirm the "
                       "fingerprint with the server's admin, or pin the key now: "
                       f"ssh-keyscan {port}{settings.host} >> {settings.known_hosts}")
    recorded = _recorded_keys(settings)
    shown = f" ({recorded})" if recorded else ""
    return Finding("sftp server", OK,
                   f"{server} answers with the host key recorded in {settings.known_hosts}{shown}")


def _methods(settings: SftpSettings) -> str:
    names = [name for name, value in (("the key", settings.private_key), ("the password", settings.password))
             if value is not None]
    return " and ".join(names)


def _probe_folder(session: SftpSession, settings: SftpSettings, where: str) -> Finding:
    """Check FOLDERNAME is a folder in which a sync can work: a file is written, replaced the way a sync
    replaces files (``SftpSession.upload``: the same rename method, the same check of its outcome) and
    deleted; nothing is left. The finding names the rename method; its details, the server's facts."""
    client = session.client
    folder = settings.folder
    try:
        with deferred():
            mode = client.stat(folder).st_mode
    except FileNotFoundError:
        return Finding("sftp folder", FAILED,
                       f"remote folder {folder!r} does not exist on {where}; create it or fix "
                       "SFTP.FOLDERNAME", EXIT_SFTP)
    except FAILURES as error:
        return Finding("sftp folder", FAILED, f"remote folder {folder!r} is not usable on {where} "
                       f"({reason(error)}); fix its permissions or SFTP.FOLDERNAME", EXIT_SFTP)
    if mode is not None and not stat.S_ISDIR(mode):
        return Finding("sftp folder", FAILED, f"{folder!r} on {where} is not a folder; fix SFTP.FOLDERNAME",
                       EXIT_SFTP)
    name = f".bsu-check-{secrets.token_hex(6)}"
    existing = posixpath.join(folder, name)
    step = "create a file in"
    with _captured_warnings() as warnings:  # what the replacement noticed (e.g. a copying RENAME)
        try:
            with deferred():
                with client.open(existing, "wxb") as probe:  # x: never over an existing file
                    probe.write(PROBE_CONTENT)
                step = "replace a file in"
                session.upload(io.BytesIO(PROBE_CONTENT), name, len(PROBE_CONTENT))
                step = "delete a file in"
                client.remove(existing)
        except (*FAILURES, SftpError) as error:
            left = _remove_quietly(client, (existing,))
            leftover = f"; remove the probe file {left} there by hand" if left else ""
            cause = reason(error) if isinstance(error, FAILURES) else str(error)
            return Finding("sftp folder", FAILED,
                           f"cannot {step} {folder!r} on {where} ({cause}); a sync needs to write, rename "
                           f"and delete files there: give {settings.username} these permissions or fix "
                           f"SFTP.FOLDERNAME{leftover}", EXIT_SFTP, _server_details(session))
        except BaseException:
            _remove_quietly(client, (existing,))
            raise
    method = session.traits.rename_method or "rename"
    outcome = WARNING if warnings or method == METHOD_DELETE_THEN_RENAME else OK
    message = "; ".join([f"{folder!r} allows write, rename and delete (a probe file was written, replaced "
                         f"and removed); files are replaced by {method}", *warnings])
    return Finding("sftp folder", outcome, message, details=_server_details(session))


def _server_details(session: SftpSession) -> dict:
    """What the connection learnt about the server, for the JSON form."""
    traits = session.traits
    return {"server_software": traits.server_software, "sftp_version": traits.sftp_version,
            "extensions": sorted(traits.extensions) if traits.extensions is not None else None,
            "rename_method": traits.rename_method}


def _remove_quietly(client: paramiko.SFTPClient, paths: tuple[str, ...]) -> str | None:
    """Remove whichever of ``paths`` exists; return one that could not be removed, if any."""
    left = None
    for path in paths:
        try:
            with deferred():
                client.remove(path)
        except FileNotFoundError:
            continue
        except FAILURES:
            left = path
    return left


# --- ledger and lock ----------------------------------------------------------------------------------


def _check_ledger(config: Config) -> tuple[Finding, None]:
    working_dir = config.working_dir
    if not os.access(working_dir, os.W_OK | os.X_OK):
        return Finding("ledger", FAILED,
                       f"MISC.WORKING_DIR {working_dir} is not writable for this user; a sync saves the "
                       "ledger, lock and known_hosts there: fix its owner or permissions", EXIT_LEDGER), None
    path = config.ledger_path
    if not path.exists():
        return Finding("ledger", OK, f"no ledger yet at {path}; the first sync creates it"), None
    entries = Ledger.load(path).entries()
    deleted = sum(1 for entry in entries.values() if entry.is_deleted)
    return Finding("ledger", OK, f"{path} holds {len(entries)} request(s): {len(entries) - deleted} live, "
                   f"{deleted} deleted"), None


def _check_lock(config: Config) -> tuple[Finding, None]:
    held, pid = lock_holder(config.working_dir)
    if not held:
        return Finding("lock", INFO, "no run holds the lock now"), None
    who = f" (pid {pid})" if pid else ""
    return Finding("lock", INFO, f"a run holds the lock now{who}; a sync started meanwhile exits 11"), None

"""What a run did, and the ways it is told: a summary line, a JSON report, a Prometheus textfile.

The JSON report (``sync --json`` on stdout, and ``WORKING_DIR/last-run.json`` after every run) has
this shape, version 1 (``docs/last-run.schema.json`` is its JSON Schema)::

    {"version": 1, "command": "sync", "exit_code": 0, "dry_run": false,
     "started": "2026-11-30T22:00:00Z", "duration_seconds": 1.234, "error": null,
     "counts": {"uploaded": 2, "deleted": 1, "unchanged": 40, "failed": 0, "refused": 0},
     "bytes_uploaded": 35860000,
     "actions": [{"request_id": "2", "action": "upload", "reason": "changed", "bytes": 1234,
                  "seconds": 0.52, "outcome": "done", "error": null}, ...]}

``action`` is ``upload``, ``delete`` or ``ledger`` (the copy of the ledger on the server); ``outcome``
is ``done``, ``failed`` or ``refused`` (a deletion the mass-deletion guard held back); ``error`` is
the one-line message of a failed action, or of a failure that stopped the whole run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from broker_sftp_uploader.state.atomic import atomic_write
from broker_sftp_uploader.errors import EXIT_DELETES_REFUSED, EXIT_OK, EXIT_PARTIAL, UploaderError

REPORT_VERSION = 1
LAST_RUN_FILE = "last-run.json"
_METRIC = "broker_sftp_uploader"


@dataclass
class ActionResult:
    """One action of a run and how it went."""

    request_id: str
    action: str  # "upload", "delete" or "ledger"
    reason: str | None
    outcome: str  # "done", "failed" or "refused"
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Report:
    """What a run did; ``failures`` holds (request id, error) for every action that failed."""

    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[tuple[str, UploaderError]] = field(default_factory=list)
    ledger_uploaded: bool = False
    unchanged: int = 0
    refusal: str | None = None
    actions: list[ActionResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    duration: float = 0.0

    @property
    def bytes_uploaded(self) -> int:
        return sum(result.bytes for result in self.actions if result.action == "upload" and result.outcome == "done")

    @property
    def refused(self) -> int:
        return sum(1 for result in self.actions if result.outcome == "refused")

    def summary(self) -> str:
        """E.g. ``2 uploaded (34.2 MiB), 1 deleted, 40 unchanged, 0 failed in 3.1 s``."""
        size = f" ({format_bytes(self.bytes_uploaded)})" if self.uploaded else ""
        refused = f", {self.refused} deletions refused" if self.refusal else ""
        took = f" in {self.duration:.1f} s" if self.duration else ""
        return (f"{len(self.uploaded)} uploaded{size}, {len(self.deleted)} deleted, {self.unchanged} unchanged, "
                f"{len(self.failures)} failed{refused}{took}")

    def exit_code(self) -> int:
        """0 when everything worked; 3 when some actions failed and others worked; else the failure's code.

        Refused deletions (exit 4) count only when nothing failed: a failure is the more urgent news.
        """
        if not self.failures:
            return EXIT_DELETES_REFUSED if self.refusal else EXIT_OK
        if self.uploaded or self.deleted or self.ledger_uploaded:
            return EXIT_PARTIAL
        return self.failures[0][1].exit_code


def format_bytes(count: float) -> str:
    """``34.2 MiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - the loop returns


def _action_order(result: ActionResult) -> tuple[int, int]:
    """Deletions, uploads, then the ledger; by request id within each (parallel uploads end in any order)."""
    return ({"delete": 0, "upload": 1}.get(result.action, 2), int(result.request_id or 0))


def _timestamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_document(report: Report | None, exit_code: int, *, started: float, duration: float,
                    dry_run: bool = False, error: str | None = None) -> dict:
    """The JSON report of a run (``report`` is None when the run stopped before it did anything)."""
    report = report or Report()
    return {
        "version": REPORT_VERSION,
        "command": "sync",
        "exit_code": exit_code,
        "dry_run": dry_run,
        "started": _timestamp(started),
        "duration_seconds": round(duration, 3),
        "error": error,
        "counts": {"uploaded": len(report.uploaded), "deleted": len(report.deleted), "unchanged": report.unchanged,
                   "failed": len(report.failures), "refused": report.refused},
        "bytes_uploaded": report.bytes_uploaded,
        "actions": [{"request_id": result.request_id, "action": result.action, "reason": result.reason,
                     "bytes": result.bytes, "seconds": round(result.seconds, 3), "outcome": result.outcome,
                     "error": result.error} for result in sorted(report.actions, key=_action_order)],
    }


def write_last_run(working_dir: Path, document: dict) -> None:
    """Leave ``document`` as ``WORKING_DIR/last-run.json`` (atomically, readable by monitoring)."""
    with atomic_write(Path(working_dir) / LAST_RUN_FILE, mode=0o644) as handle:
        handle.write(json.dumps(document, indent=2).encode("utf-8") + b"\n")


def write_metrics(path: Path, document: dict) -> None:
    """Write the node_exporter textfile at ``path`` (atomically) from a run's JSON report.

    The time of the last successful run is carried over from the previous file when this run failed.
    """
    path = Path(path)
    finished = datetime.strptime(document["started"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp() + document["duration_seconds"]
    last_success = finished if document["exit_code"] == 0 else _previous_success(path)
    lines = [
        _gauge("last_run_timestamp_seconds", "When the last run ended (Unix time).", finished),
        _gauge("last_success_timestamp_seconds", "When the last run that exited 0 ended (Unix time).",
               last_success),
        _gauge("last_run_exit_code", "Exit code of the last run (see the README's table).", document["exit_code"]),
        _gauge("last_run_duration_seconds", "How long the last run took.", document["duration_seconds"]),
        _gauge("last_run_uploaded_bytes", "Bytes uploaded by the last run.", document["bytes_uploaded"]),
        f"# HELP {_METRIC}_last_run_actions Actions of the last run, by outcome.\n"
        f"# TYPE {_METRIC}_last_run_actions gauge\n"
        + "".join(f'{_METRIC}_last_run_actions{{outcome="{name}"}} {value}\n'
                  for name, value in document["counts"].items()),
    ]
    with atomic_write(path, mode=0o644) as handle:
        handle.write("".join(lines).encode("ascii"))


def _gauge(name: str, help_text: str, value: float | None) -> str:
    text = f"# HELP {_METRIC}_{name} {help_text}\n# TYPE {_METRIC}_{name} gauge\n"
    if value is None:
        return text
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text + f"{_METRIC}_{name} {shown}\n"


def _previous_success(path: Path) -> float | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    found = re.search(rf"^{_METRIC}_last_success_timestamp_seconds (\S+)$", text, re.MULTILINE)
    try:
        return float(found.group(1)) if found else None
    except ValueError:
        return None

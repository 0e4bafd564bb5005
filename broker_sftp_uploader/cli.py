"""Command line: ``sync``, ``check``, ``status``, ``keygen``, ``fingerprint`` and ``decrypt``. The only module
that knows click.

Each command parses its options, sets up logging, calls the core and turns an ``UploaderError``
into one ``Error: …`` line on stderr and its exit code. Any other exception is a bug: its traceback
goes out (cron mails it) with exit code 1.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import sys
import textwrap
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import click

from broker_sftp_uploader import __version__, interrupts
from broker_sftp_uploader.config import load_config
from broker_sftp_uploader.commands import keys
from broker_sftp_uploader.errors import (
    EXIT_BROKER,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_DELETES_REFUSED,
    EXIT_INTERRUPTED,
    EXIT_KEY,
    EXIT_LEDGER,
    EXIT_LOCKED,
    EXIT_NOT_PROVEN,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    EXIT_SFTP,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    LogFileError,
    UploaderError,
)
from broker_sftp_uploader.commands.sync import SyncOptions, execute_sync
from broker_sftp_uploader.engine.progress import Progress

# Each command's exit codes, in the order of errors.EXIT_CODES; its --help lists exactly these.
COMMAND_EXIT_CODES: dict[str, tuple[int, ...]] = {
    "sync": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_PARTIAL, EXIT_DELETES_REFUSED, EXIT_CONFIG,
             EXIT_LOCKED, EXIT_KEY, EXIT_BROKER, EXIT_SFTP, EXIT_LEDGER, EXIT_INTERRUPTED),
    "check": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_CONFIG, EXIT_KEY, EXIT_BROKER, EXIT_SFTP,
              EXIT_LEDGER, EXIT_INTERRUPTED),
    "status": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_CONFIG, EXIT_KEY, EXIT_BROKER, EXIT_SFTP,
               EXIT_LEDGER, EXIT_NOT_PROVEN, EXIT_INTERRUPTED),
    # keygen and fingerprint are over in milliseconds: no signal handling, so no 130 worth naming.
    "keygen": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_KEY),
    "fingerprint": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_KEY),
    "decrypt": (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_KEY, EXIT_OUTPUT, EXIT_INTERRUPTED),
}


def _exit_codes_help(command: str, wording: Mapping[int, str] | None = None, heading: str = "Exit codes:",
                     note: str = "") -> str:
    """Return the exit-code part of ``command``'s --help: each of its codes (``COMMAND_EXIT_CODES``) with
    the meaning ``errors.EXIT_CODES`` gives it, or the command's own ``wording`` of it; ``note`` after."""
    wording = wording or {}
    assert set(wording) <= set(COMMAND_EXIT_CODES[command]), f"{command}: wording for a code it never gives"
    lines = ["\b", heading]
    for code in COMMAND_EXIT_CODES[command]:
        lines += textwrap.wrap(wording.get(code, EXIT_CODES[code].meaning), width=76,
                               initial_indent=f"{code:>4}  ", subsequent_indent=" " * 6)
    if note:
        lines += textwrap.wrap(note, width=76, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines) + "\n"


_LOG_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Log lines on stderr; the progress line (if any) is erased before each."""

    progress: Progress | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            self.progress.clear()
        super().emit(record)


def _setup_logging(verbosity: int) -> _StderrHandler:
    """Warnings and errors only by default (cron mails any output); -v info, -vv debug incl. paramiko."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = _StderrHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity == 0 else _LOG_LAYOUT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paramiko reports failures we report ourselves, in several lines; keep it quiet unless -vv.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)
    return handler


def _add_log_file(path: Path) -> None:
    """Append INFO (and worse) to ``path`` as well, whatever stderr shows."""
    try:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as error:
        raise LogFileError(f"cannot open the log file {path}: {error.strerror or error}; check --log-file / "
                           "MISC.LOG_FILE") from None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_LOG_LAYOUT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _reports_errors(command):
    """Turn expected failures into one line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UploaderError as error:
            _fail(str(error), error.exit_code)
        except KeyboardInterrupt:
            what = ("; the ledger holds every completed action and unfinished uploads were removed"
                    if command.__name__ == "sync" else "")
            _fail(f"interrupted{what}", EXIT_INTERRUPTED)

    return wrapper


_verbose_option = click.option("-v", "--verbose", count=True, help="Show progress (-v) or debug output (-vv).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="broker-sftp-uploader")
def cli() -> None:
    """Deliver the results of tagged AKTIN broker requests, Fernet-encrypted, to an SFTP server."""


SYNC_EPILOG = """\b
Examples:
  broker-sftp-uploader sync -c /etc/aktin/sftp-upload.toml            # as cron runs it
  broker-sftp-uploader sync -c /etc/aktin/sftp-upload.toml --dry-run  # what would it do?
  broker-sftp-uploader sync -c /etc/aktin/sftp-upload.toml --request 42   # send 42 again
  broker-sftp-uploader sync -c /etc/aktin/sftp-upload.toml --repair   # restore damaged files

""" + _exit_codes_help("sync", {
    EXIT_KEY: "key file missing or invalid (Fernet key, SSH private key)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); the ledger holds every completed action and unfinished "
                      "uploads were removed: the next run continues",
})

_config_option = click.option(
    "-c", "--config", "config_path", required=True, envvar="BROKER_SFTP_UPLOADER_CONFIG",
    type=click.Path(dir_okay=False, path_type=Path), show_envvar=True,
    help="TOML config file (the original script's format).")


@cli.command(epilog=SYNC_EPILOG, short_help="Upload new and changed results, delete vanished ones.")
@_config_option
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing anywhere.")
@click.option("--allow-deletes", is_flag=True,
              help="Delete vanished requests' files even beyond the mass-deletion guard (this run only).")
@click.option("--request", "requests", multiple=True, metavar="ID",
              help="Re-send exactly this request, whatever the ledger says, and nothing else (repeatable).")
@click.option("--repair", is_flag=True,
              help="First re-upload every file that is missing or damaged on the server, then sync as usual.")
@click.option("--verify", is_flag=True,
              help="With --repair: damaged includes failing the Fernet check of `status --remote --verify` "
                   "(every live file is read back).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run's report as one JSON object on stdout (as in WORKING_DIR/last-run.json).")
@click.option("--progress/--no-progress", default=None,
              help="Show transfer progress and a summary line on stderr [default: when stderr is a terminal].")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append an INFO log to this file (default: MISC.LOG_FILE).")
@_verbose_option
@_reports_errors
def sync(config_path: Path, dry_run: bool, allow_deletes: bool, requests: tuple[str, ...], repair: bool,
         verify: bool, as_json: bool, progress: bool | None, log_file: Path | None, verbose: int) -> None:
    """Upload new and changed results, delete vanished ones, and record it all in the ledger.

    Quiet on success when not on a terminal; meant to run from cron. Every run leaves its report
    in WORKING_DIR/last-run.json (and in MISC.METRICS_FILE for Prometheus, if set).
    """
    stderr_handler = _setup_logging(verbose)
    interrupts.install()
    bad = [request_id for request_id in requests if not request_id.isdigit()]
    if bad:
        raise click.BadParameter(f"not a request id: {bad[0]!r}", param_hint="--request")
    if requests and repair:
        raise click.UsageError("use either --request or --repair, not both")
    if verify and not repair:
        raise click.UsageError("--verify is an option of --repair: use `sync --repair --verify`")
    config = load_config(config_path)
    if log_file or config.log_file:
        _add_log_file(log_file or config.log_file)
    shown = sys.stderr.isatty() if progress is None else progress
    line = Progress(sys.stderr if shown and not dry_run else None)
    stderr_handler.progress = line
    options = SyncOptions(dry_run=dry_run, allow_deletes=allow_deletes,
                          requests=tuple(str(int(request_id)) for request_id in requests), repair=repair,
                          verify=verify)
    try:
        outcome = execute_sync(config, options, show=partial(click.echo, err=as_json), progress=line)
    finally:
        line.close()
    if as_json:
        click.echo(json.dumps(outcome.document, indent=2))
    report, code = outcome.report, outcome.exit_code
    if shown and report is not None and not dry_run:
        click.echo(report.summary(), err=True)
    if outcome.error is not None:
        raise outcome.error
    assert report is not None
    if code == EXIT_DELETES_REFUSED:
        _fail(report.refusal or "deletions refused", code)
    if report.refusal:
        logging.getLogger(__name__).error("%s", report.refusal)
    if code:
        failed = ", ".join(request_id for request_id, _ in report.failures)
        total = len(report.failures) + len(report.uploaded) + len(report.deleted)
        _fail(f"{len(report.failures)} of {total} actions failed ({failed}: see above); {report.summary()}; "
              "the ledger records everything that was done", code)


def _check_epilog() -> str:
    """check's --help after its options: examples, its steps (from ``commands.check.STEPS``), exit codes."""
    from broker_sftp_uploader.commands.check import STEPS  # imports paramiko: only when the help is shown

    steps = ", ".join(f"{name} ({note})" if note else name for name, note in STEPS.items())
    return "\n".join([
        "\b", "Examples:",
        "  broker-sftp-uploader check -c /etc/aktin/sftp-upload.toml",
        "  broker-sftp-uploader check -c /etc/aktin/sftp-upload.toml --json | jq .exit_code",
        "", "\b", "Steps, one line each (ok, warning, FAILED, info or skipped):",
        *textwrap.wrap(steps, width=76, initial_indent="  ", subsequent_indent="  "),
        "", _exit_codes_help("check", {
            EXIT_OK: "every step passed (warnings allowed)",
            EXIT_KEY: "Fernet key or SSH private key missing or invalid",
            EXIT_BROKER: "broker unreachable or failing, API key unknown or not an admin key",
            EXIT_SFTP: "SFTP server unreachable, host key changed, login refused, or FOLDERNAME missing or "
                       "not writable, renamable and deletable",
            EXIT_LEDGER: "ledger unreadable, lock file unusable, WORKING_DIR not writable",
            EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); the probe file was removed, nothing changed",
        }, heading="Exit codes (that of the first failed step):")])


class _LateEpilogCommand(click.Command):
    """A command whose epilog is a function, called only when its --help is shown (check's names its
    steps, whose module imports paramiko: every other command line would pay for that import)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if callable(self.epilog):
            self.epilog = self.epilog()
        super().format_epilog(ctx, formatter)


@cli.command(cls=_LateEpilogCommand, epilog=_check_epilog,
             short_help="Check the whole set-up; change nothing.")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the lines.")
@_reports_errors
def check(config_path: Path, as_json: bool) -> None:
    """Check the set-up step by step, and change nothing: no ledger write, no lock taken, no host key
    recorded, nothing left on the server. Run it after installing, after changing the config, and
    when a run failed.
    """
    _setup_logging(0)
    interrupts.install()
    from broker_sftp_uploader.commands.check import run_checks  # paramiko: only for the commands that connect

    result = run_checks(config_path)
    if as_json:
        click.echo(json.dumps(result.document(), indent=2))
    else:
        for line in result.lines():
            click.echo(line)
    sys.exit(result.exit_code)


STATUS_EPILOG = """\b
Examples:
  broker-sftp-uploader status -c /etc/aktin/sftp-upload.toml
  broker-sftp-uploader status -c /etc/aktin/sftp-upload.toml --remote
  broker-sftp-uploader status -c /etc/aktin/sftp-upload.toml --remote --verify   # read every file back
  broker-sftp-uploader status -c /etc/aktin/sftp-upload.toml --json | jq '.requests[0]'

""" + _exit_codes_help("status", {
    EXIT_OK: "shown (also when --remote without --verify found missing or damaged files)",
    EXIT_KEY: "(--remote) SSH private key missing or invalid; (--verify) Fernet key file missing or invalid",
    EXIT_BROKER: "(--remote) broker unreachable or failing",
    EXIT_SFTP: "(--remote) SFTP login or folder listing failed",
    EXIT_LEDGER: "ledger unreadable",
})


@cli.command(epilog=STATUS_EPILOG, short_help="Show the ledger; with --remote, broker and server too.")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--remote", is_flag=True,
              help="Also show what the next run would do (asks the broker) and which files on the server are "
                   "missing, of the wrong size or not in the ledger (lists FOLDERNAME).")
@click.option("--verify", is_flag=True,
              help="With --remote: also read every live file back and check its Fernet token with the key "
                   "file (HMAC, format, key, timestamp), writing nothing; exit 17 unless all are proven.")
@_verbose_option
@_reports_errors
def status(config_path: Path, as_json: bool, remote: bool, verify: bool, verbose: int) -> None:
    """Show the ledger, newest first: each request's completion, remote file, and when it was uploaded,
    updated and deleted. Read-only; works while a sync runs.
    """
    _setup_logging(verbose)
    interrupts.install()
    from broker_sftp_uploader.commands.status import build_status

    if verify and not remote:
        raise click.UsageError("--verify checks the server's files: use it with --remote")
    view = build_status(load_config(config_path), remote=remote, verify=verify)
    if as_json:
        click.echo(json.dumps(view.document(), indent=2))
    else:
        for line in view.lines():
            click.echo(line)
    sys.exit(view.exit_code)


KEYGEN_EPILOG = _exit_codes_help("keygen", {EXIT_OK: "key written",
                                            EXIT_KEY: "PATH exists or cannot be created"})


@cli.command(epilog=KEYGEN_EPILOG, short_help="Write a new Fernet key file and print its fingerprint.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_reports_errors
def keygen(path: Path) -> None:
    """Write a new Fernet key to PATH (mode 0600; never overwrites an existing file).

    Prints the key's fingerprint, never the key. Give the key to the receiver on a safe channel and
    compare fingerprints on the phone. The file belongs to whoever runs keygen: run it as the user
    that runs sync, or hand the file over with install -o.

    \b
    Examples:
      broker-sftp-uploader keygen /etc/aktin/rki.key
      sudo -u aktin broker-sftp-uploader keygen /etc/aktin/rki.key
    """
    fingerprint = keys.keygen(path)
    click.echo(f"wrote a new key to {path}; fingerprint {fingerprint} (compare it with the receiver's)")


FINGERPRINT_EPILOG = """\b
Without this tool, for a key file as keygen writes it (one key):
  head -n1 rki.key | tr -d '\\n' | sha256sum | cut -c1-8

""" + _exit_codes_help("fingerprint", {
    EXIT_OK: "printed",
    EXIT_KEY: "KEYFILE missing, unreadable, holding no key or a line that is not a key",
})


@cli.command("fingerprint", epilog=FINGERPRINT_EPILOG, short_help="Print the fingerprint of each key in a file.")
@click.argument("key_file", metavar="KEYFILE", type=click.Path(dir_okay=False, path_type=Path))
@_reports_errors
def fingerprint_command(key_file: Path) -> None:
    """Print the fingerprint of every key in KEYFILE, one line each, in file order.

    The same value keygen printed: the first 8 hex digits of the SHA-256 of the key's text without its
    line end. The first line is the key sync encrypts with.

    \b
    Example:
      broker-sftp-uploader fingerprint rki.key
    """
    _setup_logging(0)
    for fingerprint in keys.fingerprints(key_file):
        click.echo(fingerprint)


DECRYPT_EPILOG = _exit_codes_help("decrypt", {
    EXIT_OK: "every FILE decrypted",
    EXIT_KEY: "a key file is missing or invalid, or a FILE failed to decrypt (wrong key, tampered, "
              "truncated, not a Fernet file)",
    EXIT_OUTPUT: "an output file exists (pass --force to replace it), is FILE itself, or cannot be written "
                 "(its folder cannot be created, is not writable, disk full)",
}, note="With several FILEs the others are still done; 12 wins over 16.")


@cli.command(epilog=DECRYPT_EPILOG, short_help="Decrypt files made by sync (the receiver's side).")
@click.option("-k", "--key", "key_files", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Key file; may hold several keys, one per line. Repeat for more files.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Output file for a single FILE; '-' writes to stdout.")
@click.option("-d", "--output-dir", type=click.Path(path_type=Path),
              help="Folder for the decrypted files, under FILE's own name; created if missing. "
                   "Default: beside each FILE, as NAME.decrypted.zip.")
@click.option("-f", "--force", is_flag=True, help="Replace existing output files.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_verbose_option
@_reports_errors
def decrypt(key_files: tuple[Path, ...], output: Path | None, output_dir: Path | None, force: bool,
            files: tuple[Path, ...], verbose: int) -> None:
    """Decrypt FILE(s) made by sync. Output is written only after the file's signature verified.

    Each plaintext goes beside its FILE, with ".decrypted" before the extension (export_2.zip gives
    export_2.decrypted.zip); with --output-dir, into that folder under FILE's own name. Existing files
    are replaced only with --force, FILE itself never.

    \b
    Examples:
      broker-sftp-uploader decrypt --key rki.key export_2.zip
          writes export_2.decrypted.zip
      broker-sftp-uploader decrypt --key rki.key export_*.zip --output-dir plain/
          writes plain/export_2.zip, plain/export_4.zip, ...
      broker-sftp-uploader decrypt --key rki.key export_2.zip -o bundle.zip
    """
    _setup_logging(verbose)
    interrupts.install()
    if output is not None and output_dir is not None:
        raise click.UsageError("use either --output or --output-dir, not both")
    if output is not None and len(files) > 1:
        raise click.UsageError("--output takes a single FILE; use --output-dir for several")
    code = keys.decrypt(key_files, files, output=output, output_dir=output_dir, force=force,
                        stdout=sys.stdout.buffer, report=lambda error: click.echo(f"Error: {error}", err=True))
    sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    # What the imports made lives as long as the process: kept out of the cyclic garbage collector, its
    # passes skip it, the last one at exit too (about 0.07 s of a short run; see the README's Benchmarks).
    gc.freeze()
    cli(prog_name="broker-sftp-uploader")

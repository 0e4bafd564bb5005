"""Command line: ``sync``, ``keygen`` and ``decrypt``. The only module that knows click.

Each command parses its options, sets up logging, calls the core and turns an ``UploaderError``
into one ``Error: …`` line on stderr and its exit code. Any other exception is a bug: its traceback
goes out (cron mails it) with exit code 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from broker_sftp_uploader import __version__, interrupts
from broker_sftp_uploader.config import load_config
from broker_sftp_uploader.crypto import decrypt_file, decrypt_to_stream, generate_key_file, load_keys
from broker_sftp_uploader.errors import EXIT_DELETES_REFUSED, EXIT_KEY, UploaderError
from broker_sftp_uploader.job import exit_code_for, run_sync

EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\b
Exit codes:
   0  success (also: nothing to do)
   1  unexpected error (a bug: please report the traceback)
   2  usage error
   3  partial: some requests failed, the rest were done and recorded
   4  deletions refused: the run would delete more files than
      REQUESTS.MAX_DELETE_PERCENT / MAX_DELETE_COUNT allow; uploads were
      done, nothing deleted (check REQUESTS.TAG, or pass --allow-deletes)
  10  config invalid
  11  another run holds the lock
  12  key missing or invalid (Fernet key, SSH private key) / decryption failed
  13  broker unreachable, answering errors, or too slow (time limits)
  14  SFTP connect, login or transfer failure
  15  ledger (status.xml) unreadable or unwritable
"""


DECRYPT_EXIT_CODES_HELP = """\b
Exit codes:
   0  every FILE decrypted
   2  usage error
  12  a key file is missing or invalid, or a FILE failed to decrypt (wrong key,
      tampered, truncated, not a Fernet file); the other FILEs are still done
"""


def _setup_logging(verbosity: int) -> None:
    """Warnings and errors only by default (cron mails any output); -v info, -vv debug incl. paramiko."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    layout = "%(levelname)s: %(message)s" if verbosity == 0 else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(layout))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paramiko reports failures we report ourselves, in several lines; keep it quiet unless -vv.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbosity >= 2 else logging.CRITICAL)


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
            _fail("interrupted; the ledger holds every completed action and unfinished uploads were removed",
                  EXIT_INTERRUPTED)

    return wrapper


_verbose_option = click.option("-v", "--verbose", count=True, help="Show progress (-v) or debug output (-vv).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="broker-sftp-uploader")
def cli() -> None:
    """Deliver the results of tagged AKTIN broker requests, Fernet-encrypted, to an SFTP server."""


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("-c", "--config", "config_path", required=True, envvar="BROKER_SFTP_UPLOADER_CONFIG",
              type=click.Path(dir_okay=False, path_type=Path), show_envvar=True,
              help="TOML config file (the original script's format).")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing anywhere.")
@click.option("--allow-deletes", is_flag=True,
              help="Delete vanished requests' files even beyond the mass-deletion guard (this run only).")
@_verbose_option
@_reports_errors
def sync(config_path: Path, dry_run: bool, allow_deletes: bool, verbose: int) -> None:
    """Upload new and changed results, delete vanished ones, and record it all in the ledger.

    Quiet on success; meant to run from cron.
    """
    _setup_logging(verbose)
    interrupts.install()
    config = load_config(config_path)
    report = run_sync(config, dry_run=dry_run, allow_deletes=allow_deletes, show=click.echo)
    code = exit_code_for(report)
    if code == EXIT_DELETES_REFUSED:
        _fail(report.refusal or "deletions refused", code)
    if report.refusal:
        logging.getLogger(__name__).error("%s", report.refusal)
    if code:
        failed = ", ".join(request_id for request_id, _ in report.failures)
        _fail(f"{len(report.failures)} action(s) failed ({failed}); {report.summary()}; "
              "the ledger records everything that was done", code)


@cli.command(epilog="Exit codes: 0 written, 12 PATH exists or cannot be created.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_reports_errors
def keygen(path: Path) -> None:
    """Write a new Fernet key to PATH (mode 0600; never overwrites an existing file)."""
    fingerprint = generate_key_file(path)
    click.echo(f"wrote a new key to {path}; fingerprint {fingerprint} (compare it with the receiver's)")


@cli.command(epilog=DECRYPT_EXIT_CODES_HELP)
@click.option("-k", "--key", "key_files", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Key file; may hold several keys, one per line. Repeat for more files.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Output file for a single FILE; '-' writes to stdout.")
@click.option("-d", "--output-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder for the decrypted files (same names). Default: the current folder.")
@click.option("-f", "--force", is_flag=True, help="Replace existing output files.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_verbose_option
@_reports_errors
def decrypt(key_files: tuple[Path, ...], output: Path | None, output_dir: Path | None, force: bool,
            files: tuple[Path, ...], verbose: int) -> None:
    """Decrypt FILE(s) made by sync. Output is written only after the file's signature verified."""
    _setup_logging(verbose)
    interrupts.install()
    if output is not None and output_dir is not None:
        raise click.UsageError("use either --output or --output-dir, not both")
    if output is not None and len(files) > 1:
        raise click.UsageError("--output takes a single FILE; use --output-dir for several")
    keys = [key for key_file in key_files for key in load_keys(key_file)]
    if output is not None and str(output) == "-":
        decrypt_to_stream(keys, files[0], sys.stdout.buffer)
        return
    folder = output_dir or Path.cwd()
    failures = 0
    for source in files:
        target = output if output is not None else folder / source.name
        try:
            decrypt_file(keys, source, target, overwrite=force)
        except UploaderError as error:
            failures += 1
            click.echo(f"Error: {error}", err=True)
            continue
        logging.getLogger(__name__).info("decrypted %s to %s", source, target)
    if failures:
        sys.exit(EXIT_KEY)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="broker-sftp-uploader")

"""Error types of broker-sftp-uploader, each carrying the exit code the CLI reports.

This module imports nothing from the package, so every other module may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_DELETES_REFUSED = 4
EXIT_CONFIG = 10
EXIT_LOCKED = 11
EXIT_KEY = 12
EXIT_BROKER = 13
EXIT_SFTP = 14
EXIT_LEDGER = 15
EXIT_OUTPUT = 16  # decrypt: the output file exists (no --force), is the input, or cannot be written
EXIT_NOT_PROVEN = 17  # status --verify: a live file is missing, of the wrong size, or fails its Fernet check
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a program stopped by Ctrl-C


@dataclass(frozen=True)
class ExitCode:
    """One exit code: ``summary`` is the few words every place that lists it uses (the README's tables
    too, which a test compares), ``meaning`` what ``--help`` says about it."""

    code: int
    summary: str
    meaning: str


# Every exit code of every command. Each command's --help lists its share of these, in this order.
EXIT_CODES: dict[int, ExitCode] = {exit_code.code: exit_code for exit_code in (
    ExitCode(EXIT_OK, "success", "success (also: nothing to do)"),
    ExitCode(EXIT_UNEXPECTED, "unexpected error", "unexpected error (a bug: please report the traceback)"),
    ExitCode(EXIT_USAGE, "usage error", "usage error"),
    ExitCode(EXIT_PARTIAL, "some requests failed",
             "partial: some requests failed, the rest were done and recorded"),
    ExitCode(EXIT_DELETES_REFUSED, "deletions refused",
             "deletions refused: the run would delete more files than REQUESTS.MAX_DELETE_PERCENT / "
             "MAX_DELETE_COUNT allow; uploads were done, nothing deleted (check REQUESTS.TAG, or pass "
             "--allow-deletes)"),
    ExitCode(EXIT_CONFIG, "config invalid", "config invalid"),
    ExitCode(EXIT_LOCKED, "another run holds the lock", "another run holds the lock"),
    ExitCode(EXIT_KEY, "key file",
             "key file missing or invalid (Fernet key, SSH private key) / decryption failed"),
    ExitCode(EXIT_BROKER, "broker", "broker unreachable, answering errors, or too slow (time limits)"),
    ExitCode(EXIT_SFTP, "SFTP", "SFTP connect, login or transfer failure"),
    ExitCode(EXIT_LEDGER, "ledger", "ledger (status.xml) unreadable or unwritable"),
    ExitCode(EXIT_OUTPUT, "output file",
             "an output file exists (pass --force to replace it), is its own input, or cannot be written"),
    ExitCode(EXIT_NOT_PROVEN, "delivery not proven",
             "--verify: a live request's file on the server is missing, has the wrong size, or fails the "
             "Fernet check (tampered, truncated, another key, a timestamp in the future)"),
    ExitCode(EXIT_INTERRUPTED, "interrupted", "interrupted (Ctrl-C, SIGTERM)"),
)}


class UploaderError(Exception):
    """Base of every expected failure: a message for the operator and an exit code."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(UploaderError):
    """The configuration file is missing, unreadable or invalid; ``problems`` lists every finding."""

    exit_code = EXIT_CONFIG

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        super().__init__(f"invalid config {path}: {joined}")


class LogFileError(UploaderError):
    """The log file (``--log-file`` / ``MISC.LOG_FILE``) cannot be opened for appending."""

    exit_code = EXIT_CONFIG


class LockedError(UploaderError):
    """Another run holds the working directory's lock."""

    exit_code = EXIT_LOCKED


class KeyFileError(UploaderError):
    """An encryption key file is missing, unreadable or holds no valid Fernet key."""

    exit_code = EXIT_KEY


class DecryptError(UploaderError):
    """A file could not be decrypted: wrong key, tampered, truncated or not a Fernet token."""

    exit_code = EXIT_KEY


class OutputFileError(UploaderError):
    """``decrypt`` cannot write its output: the file exists (without --force), is the input itself, or its
    folder cannot be created or written. The input and the key are not at fault."""

    exit_code = EXIT_OUTPUT


class BrokerError(UploaderError):
    """The broker could not be reached or answered with an error."""

    exit_code = EXIT_BROKER


class SftpError(UploaderError):
    """Connecting, authenticating or transferring over SFTP failed."""

    exit_code = EXIT_SFTP


class DeletionRefusedError(UploaderError):
    """The run would delete more remote files than the mass-deletion guard allows; it deleted none."""

    exit_code = EXIT_DELETES_REFUSED


class LedgerError(UploaderError):
    """The state ledger (status.xml) cannot be read, parsed or written."""

    exit_code = EXIT_LEDGER

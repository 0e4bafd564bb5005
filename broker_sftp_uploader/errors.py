"""Error types of broker-sftp-uploader, each carrying the exit code the CLI reports.

This module imports nothing from the package, so every other module may use it.
"""

from __future__ import annotations

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

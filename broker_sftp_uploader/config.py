"""Read and validate the TOML configuration into frozen settings objects.

The file format is the original script's (sections BROKER, REQUESTS, SFTP, SECURITY, MISC and the
top-level REQUESTS_CA_BUNDLE), so an existing config works unchanged. Every problem is collected
first and reported together in one ``ConfigError``, each naming its key.

Each secret (broker API key, SFTP password, key passphrase) comes from exactly one source: the key
itself, a ``…_FILE`` key naming a file that holds it, or an environment variable. Secrets never
appear in a message, a log line or a repr.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_sftp_uploader.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

LEDGER_FILE_NAME = "status.xml"
ENV_PREFIX = "BROKER_SFTP_UPLOADER_"
# A secret file holds one line; anything bigger is the wrong file (and /dev/zero must not hang us).
SECRET_FILE_LIMIT = 64 * 1024
DEFAULT_TRANSPORT = "paramiko"
TRANSPORTS = (DEFAULT_TRANSPORT, "openssh")
DEFAULT_UPLOAD_LEDGER = True


@dataclass(frozen=True)
class NumberKey:
    """A number in the config: its key, default (None: none, or required) and the range it must lie in.

    The settings below take their defaults from here, and so does the reader; the README's config
    table and the sample config state the same (tests compare them).
    """

    section: str
    key: str
    default: float | None
    minimum: float
    maximum: float | None  # None: no upper limit
    integer: bool
    required: bool = False

    @property
    def name(self) -> str:
        """The key as messages and the README name it: ``SECTION.KEY``."""
        return f"{self.section}.{self.key}"


CALL_TIMEOUT = NumberKey("BROKER", "CALL_TIMEOUT", 60.0, 1, 3600, integer=False)
EXPORT_TIMEOUT = NumberKey("BROKER", "EXPORT_TIMEOUT", 1800.0, 1, 86400, integer=False)
BROKER_RETRIES = NumberKey("BROKER", "RETRIES", 3, 0, 10, integer=True)
CONCURRENCY = NumberKey("BROKER", "CONCURRENCY", 32, 1, 64, integer=True)
MAX_DELETE_PERCENT = NumberKey("REQUESTS", "MAX_DELETE_PERCENT", 50.0, 0, 100, integer=False)
MAX_DELETE_COUNT = NumberKey("REQUESTS", "MAX_DELETE_COUNT", None, 0, None, integer=True)
SFTP_PORT = NumberKey("SFTP", "PORT", 22, 1, 65535, integer=True)
SFTP_TIMEOUT = NumberKey("SFTP", "TIMEOUT", None, 1, 3600, integer=False, required=True)
SFTP_RETRIES = NumberKey("SFTP", "RETRIES", 3, 0, 10, integer=True)
# Seconds between SSH keepalives while a session is idle (0: none); under the 60-300 s after which NATs and
# firewalls commonly drop an idle TCP session.
SFTP_KEEPALIVE = NumberKey("SFTP", "KEEPALIVE", 30, 0, 3600, integer=True)
# OpenSSH allows 10 sessions per connection (MaxSessions): 8 workers and the main session fit.
PARALLEL_UPLOADS = NumberKey("SFTP", "PARALLEL_UPLOADS", 8, 1, 9, integer=True)
RUN_TIMEOUT = NumberKey("MISC", "RUN_TIMEOUT", 14400.0, 60, 604800, integer=False)
NUMBER_KEYS = (CALL_TIMEOUT, EXPORT_TIMEOUT, BROKER_RETRIES, CONCURRENCY, MAX_DELETE_PERCENT,
               MAX_DELETE_COUNT, SFTP_PORT, SFTP_TIMEOUT, SFTP_RETRIES, SFTP_KEEPALIVE, PARALLEL_UPLOADS,
               RUN_TIMEOUT)


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate to it."""

    url: str
    api_key: str = field(repr=False)
    tag: str
    ca_bundle: Path | None = None
    call_timeout: float = CALL_TIMEOUT.default  # seconds for a listing or request-status call
    export_timeout: float = EXPORT_TIMEOUT.default  # seconds for the export call (the bundle is built first)
    retries: int = BROKER_RETRIES.default  # retries of the idempotent calls
    concurrency: int = CONCURRENCY.default  # request-status calls at once


@dataclass(frozen=True)
class SftpSettings:
    """The SFTP server, its login and the remote folder for uploads."""

    host: str
    port: int
    username: str
    password: str | None = field(repr=False)  # None: log in with the private key alone
    timeout: float
    folder: str
    known_hosts: Path
    upload_ledger: bool = DEFAULT_UPLOAD_LEDGER
    retries: int = SFTP_RETRIES.default  # retries of the connect after connection-level failures
    private_key: Path | None = None
    private_key_passphrase: str | None = field(default=None, repr=False)
    parallel_uploads: int = PARALLEL_UPLOADS.default  # requests exported, encrypted and uploaded at once
    transport: str = DEFAULT_TRANSPORT  # "paramiko" (in-process SSH) or "openssh" (an `ssh -s sftp` child)
    keepalive: int = SFTP_KEEPALIVE.default  # seconds between SSH keepalives while idle; 0: none


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; paths are absolute."""

    source: Path
    broker: BrokerSettings
    sftp: SftpSettings
    key_path: Path
    working_dir: Path
    max_delete_percent: float = MAX_DELETE_PERCENT.default  # mass-deletion guard: share of the live files
    max_delete_count: int | None = MAX_DELETE_COUNT.default  # mass-deletion guard: files; None: no limit
    run_timeout: float = RUN_TIMEOUT.default  # seconds one run may take in all
    metrics_file: Path | None = None  # Prometheus textfile for node_exporter, rewritten after each run
    log_file: Path | None = None  # INFO log appended by every run

    @property
    def ledger_path(self) -> Path:
        """The state ledger, ``WORKING_DIR/status.xml`` as in the original script."""
        return self.working_dir / LEDGER_FILE_NAME

    def run_deadline(self) -> float:
        """Return the ``time.monotonic()`` value by which a run (sync, check, status) starting now ends."""
        return time.monotonic() + self.run_timeout

    def secrets(self) -> tuple[str, ...]:
        """Return every secret value of the config, for redacting them from output."""
        values = (self.broker.api_key, self.sftp.password, self.sftp.private_key_passphrase)
        return tuple(value for value in values if value)


class _Reader:
    """Takes typed values out of the parsed TOML and remembers every problem on the way."""

    def __init__(self, data: dict[str, Any], base_dir: Path, environ: Mapping[str, str]):
        self.data = data
        self.base_dir = base_dir
        self.environ = environ
        self.problems: list[str] = []

    def given(self, section: str | None, key: str) -> bool:
        table = self.data if section is None else self.data.get(section)
        return isinstance(table, dict) and key in table

    def _raw(self, section: str | None, key: str, required: bool) -> Any:
        name = f"{section}.{key}" if section else key
        if not self.given(section, key):
            if required:
                self.problems.append(f"{name}: missing")
            return None
        table = self.data if section is None else self.data[section]
        return table[key]

    def text(self, section: str | None, key: str, required: bool = True) -> str | None:
        value = self._raw(section, key, required)
        name = f"{section}.{key}" if section else key
        if value is None:
            return None
        if not isinstance(value, str):
            self.problems.append(f"{name}: expected a string, got {_describe(value)}")
            return None
        if not value.strip():
            self.problems.append(f"{name}: must not be empty")
            return None
        return value

    def number(self, spec: NumberKey) -> float | None:
        """The number ``spec`` names, or its default; None if it is invalid (the problem is recorded).

        Also accepted as a numeric string ("25"), because the original configs write it so.
        """
        value = self._raw(spec.section, spec.key, spec.required)
        name, minimum, maximum = spec.name, spec.minimum, spec.maximum
        if value is None:
            return spec.default
        kind = "a whole number" if spec.integer else "a number"
        parsed: float | None = None
        if isinstance(value, bool):
            parsed = None
        elif isinstance(value, int) or (isinstance(value, float) and not spec.integer):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = int(value.strip()) if spec.integer else float(value.strip())
            except ValueError:
                parsed = None
        if parsed is None:
            self.problems.append(f"{name}: expected {kind}, got {_describe(value)}")
            return None
        if maximum is None and not minimum <= parsed:
            self.problems.append(f"{name}: must be at least {minimum:g}, got {parsed:g}")
            return None
        if maximum is not None and not minimum <= parsed <= maximum:
            self.problems.append(f"{name}: must be between {minimum:g} and {maximum:g}, got {parsed:g}")
            return None
        return parsed

    def flag(self, section: str, key: str, default: bool) -> bool:
        value = self._raw(section, key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{section}.{key}: expected true or false, got {_describe(value)}")
            return default
        return value

    def path(self, section: str | None, key: str, required: bool = True) -> Path | None:
        value = self.text(section, key, required)
        if value is None:
            return None
        return (self.base_dir / Path(value).expanduser()).resolve()

    def secret(self, section: str, key: str) -> tuple[str | None, bool]:
        """Return the secret ``section.key`` from its one source, and whether any source was given.

        The sources are the key itself, ``key_FILE`` (a file holding the secret) and an environment
        variable; more than one is a problem. A problem's text never holds the secret.
        """
        name = f"{section}.{key}"
        variable = SECRET_VARIABLES[name]
        candidates = ((name, self.given(section, key)),
                      (f"{name}_FILE", self.given(section, f"{key}_FILE")),
                      (f"the environment variable {variable}", variable in self.environ))
        sources = [label for label, given in candidates if given]
        if len(sources) > 1:
            times = "twice" if len(sources) == 2 else f"{len(sources)} times"
            self.problems.append(f"{name}: given {times}, by {_join(sources)}; keep exactly one")
            return None, True
        if not sources:
            return None, False
        if self.given(section, key):
            value, where = self.text(section, key), f"{name}:"
        elif self.given(section, f"{key}_FILE"):
            path = self.path(section, f"{key}_FILE")
            value = None if path is None else self._secret_file(path, f"{name}_FILE")
            where = f"{name}_FILE: file {path}"
        else:
            value, where = self.environ[variable], f"{name}: the environment variable {variable}"
            if not value:
                self.problems.append(f"{where} is empty")
                return None, True
        problem = None if value is None else _bad_secret(value, header=name == "BROKER.API_KEY")
        if problem:
            self.problems.append(f"{where} {problem}")
            return None, True
        return value, True

    def _secret_file(self, path: Path, name: str) -> str | None:
        """Return the secret held in file ``path`` without its line end; log if others may read it."""
        try:
            data, mode = read_bounded_file(path, SECRET_FILE_LIMIT, f"file {path}",
                                           "; it must hold the secret only")
        except UnusableFileError as error:
            self.problems.append(f"{name}: {error}")
            return None
        warn_if_exposed(path, mode, f"secret file {path} ({name})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.problems.append(f"{name}: file {path} is not UTF-8 text")
            return None
        # One line end closes the file's only line (echo, editors); it is not part of the secret.
        text = text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
        if not text.strip():
            self.problems.append(f"{name}: file {path} is empty")
            return None
        return text


# The secrets and the environment variable each may come from instead of the config file.
SECRET_VARIABLES = {
    "BROKER.API_KEY": f"{ENV_PREFIX}API_KEY",
    "SFTP.PASSWORD": f"{ENV_PREFIX}SFTP_PASSWORD",
    "SFTP.PRIVATE_KEY_PASSPHRASE": f"{ENV_PREFIX}SFTP_PRIVATE_KEY_PASSPHRASE",
}
# Secrets a config file may hold itself; SMTP.PASSWORD is the original notifier's and otherwise ignored.
_INLINE_SECRETS = (*SECRET_VARIABLES, "SMTP.PASSWORD")

# Known keys per section; None stands for the top level. SMTP belongs to the original script's
# separate error notifier: accepted so old configs load, and otherwise ignored.
_KNOWN_KEYS: dict[str | None, set[str]] = {
    None: {"BROKER", "REQUESTS", "SFTP", "SECURITY", "MISC", "SMTP", "REQUESTS_CA_BUNDLE"},
    "BROKER": {"URL", "API_KEY", "API_KEY_FILE", "CALL_TIMEOUT", "EXPORT_TIMEOUT", "RETRIES", "CONCURRENCY"},
    "REQUESTS": {"TAG", "MAX_DELETE_PERCENT", "MAX_DELETE_COUNT"},
    "SFTP": {"HOST", "PORT", "USERNAME", "PASSWORD", "PASSWORD_FILE", "TIMEOUT", "FOLDERNAME", "KNOWN_HOSTS",
             "UPLOAD_LEDGER", "KEEPALIVE", "RETRIES", "PRIVATE_KEY", "PRIVATE_KEY_PASSPHRASE",
             "PRIVATE_KEY_PASSPHRASE_FILE", "PARALLEL_UPLOADS", "TRANSPORT"},
    "SECURITY": {"PATH_ENCRYPTION_KEY"},
    "MISC": {"WORKING_DIR", "RUN_TIMEOUT", "METRICS_FILE", "LOG_FILE"},
    "SMTP": {"HOST", "USERNAME", "PASSWORD"},
}


def is_systemd_credential(path: Path) -> bool:
    """Tell whether ``path`` is one of this service's systemd credentials (``LoadCredential=``).

    systemd hands them over in ``$CREDENTIALS_DIRECTORY`` as mode 0400 files that only the service's
    user may read, granted by an ACL entry; the ACL's mask then shows as group read bits (0440),
    which is no sign of exposure.
    """
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return False
    try:
        return Path(path).resolve().parent == Path(folder).resolve()
    except OSError:
        return False


class UnusableFileError(Exception):
    """A file that should hold a secret or a key cannot be used; the message names it, never its content."""


def read_bounded_file(path: Path, limit: int, what: str, too_large: str,
                      error: type[Exception] = UnusableFileError) -> tuple[bytes, int]:
    """Return the content of the regular file ``path`` (a secret or key file) and its ``st_mode``.

    Such a file is small: one bigger than ``limit`` bytes is the wrong file, and only ``limit`` + 1
    bytes are ever read (``/dev/zero`` named by mistake must not fill memory). A FIFO or device in its
    place is refused without blocking the run.

    :raises error: (``UnusableFileError`` unless the caller names another) the file does not exist,
        cannot be read, is not a regular file, or is larger than ``limit``. The message begins with or
        holds ``what`` (e.g. ``"file /etc/x"``); ``too_large`` ends the one about size ("; it …").
    """
    try:
        # O_NONBLOCK: a FIFO in place of the file must not block the run; fstat refuses it next.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} does not exist") from None
    except OSError as failure:
        raise error(f"cannot read {what}: {failure.strerror or failure}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISREG(mode):
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                data = handle.read(limit + 1)
    except OSError as failure:
        raise error(f"cannot read {what}: {failure.strerror or failure}") from None
    finally:
        os.close(descriptor)
    if not stat.S_ISREG(mode):
        raise error(f"{what} is not a regular file")
    if len(data) > limit:
        size = f"{limit // 1024 ** 2} MiB" if limit % 1024 ** 2 == 0 else f"{limit // 1024} KiB"
        raise error(f"{what} is larger than {size}{too_large}")
    return data, mode


def warn_if_exposed(path: Path, mode: int, subject: str, advice: str = "") -> None:
    """Given a secret-holding file's ``st_mode``, log a warning if group or others may access it.

    ``subject`` names the file and begins the message ("… is accessible by group or others").
    """
    if os.name == "posix" and mode & 0o077 and not is_systemd_credential(path):
        logger.warning("%s is accessible by group or others (mode %03o); run: chmod 600 %s%s",
                       subject, mode & 0o777, path, advice)


def _describe(value: Any) -> str:
    """Name a TOML value's type for an error message without echoing it (it may be a secret)."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "an array"}
    return names.get(type(value), type(value).__name__)


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _bad_secret(value: str, header: bool) -> str | None:
    """Tell what is wrong with a secret's characters, or None; never quotes it.

    A line break or NUL cannot be sent as a password, and requests would echo an API key holding one
    (or leading white space) in its exception, so such values are refused here.
    """
    if any(char < " " or char == "\x7f" for char in value):
        return "holds a line break or another control character; put the secret alone on one line"
    if header and value != value.strip():
        return "starts or ends with white space"
    return None


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in data.items():
        if key not in _KNOWN_KEYS[None]:
            problems.append(f"{key}: unknown key (a typo?)")
        elif key in _KNOWN_KEYS and isinstance(value, dict):
            problems.extend(f"{key}.{inner}: unknown key (a typo?)"
                            for inner in value if inner not in _KNOWN_KEYS[key])
        elif key in _KNOWN_KEYS:
            problems.append(f"{key}: expected a table [{key}], got {_describe(value)}")
    return problems


def parse_config(data: dict[str, Any], source: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Given parsed TOML, the file it came from and the environment (default ``os.environ``), return a
    validated ``Config``.

    :raises ConfigError: listing every problem found, each naming its key.
    """
    source = source.resolve()
    reader = _Reader(data, source.parent, os.environ if environ is None else environ)
    reader.problems.extend(_unknown_keys(data))

    url = reader.text("BROKER", "URL")
    if url is not None and not url.startswith(("http://", "https://")):
        reader.problems.append("BROKER.URL: must start with http:// or https://")
        url = None
    api_key, api_key_given = reader.secret("BROKER", "API_KEY")
    if not api_key_given:
        reader.problems.append("BROKER.API_KEY: missing; set it, BROKER.API_KEY_FILE or the environment "
                               f"variable {SECRET_VARIABLES['BROKER.API_KEY']}")
    call_timeout = reader.number(CALL_TIMEOUT)
    export_timeout = reader.number(EXPORT_TIMEOUT)
    broker_retries = reader.number(BROKER_RETRIES)
    concurrency = reader.number(CONCURRENCY)
    tag = reader.text("REQUESTS", "TAG")
    if tag is not None and "'" in tag:
        reader.problems.append("REQUESTS.TAG: must not contain a single quote (it ends the broker's XPath "
                               "literal)")
    max_delete_percent = reader.number(MAX_DELETE_PERCENT)
    max_delete_count = reader.number(MAX_DELETE_COUNT)
    ca_bundle = reader.path(None, "REQUESTS_CA_BUNDLE", required=False)
    if ca_bundle is not None and not ca_bundle.is_file():
        reader.problems.append(f"REQUESTS_CA_BUNDLE: file {ca_bundle} does not exist")

    host = reader.text("SFTP", "HOST")
    port = reader.number(SFTP_PORT)
    username = reader.text("SFTP", "USERNAME")
    password, password_given = reader.secret("SFTP", "PASSWORD")
    private_key = reader.path("SFTP", "PRIVATE_KEY", required=False)
    passphrase, passphrase_given = reader.secret("SFTP", "PRIVATE_KEY_PASSPHRASE")
    if not password_given and not reader.given("SFTP", "PRIVATE_KEY"):
        reader.problems.append("SFTP.PASSWORD: missing; SFTP needs a password (SFTP.PASSWORD, "
                               "SFTP.PASSWORD_FILE or the environment variable "
                               f"{SECRET_VARIABLES['SFTP.PASSWORD']}) or a key (SFTP.PRIVATE_KEY), or both")
    if passphrase_given and not reader.given("SFTP", "PRIVATE_KEY"):
        reader.problems.append("SFTP.PRIVATE_KEY_PASSPHRASE: given without SFTP.PRIVATE_KEY")
    timeout = reader.number(SFTP_TIMEOUT)
    folder = reader.text("SFTP", "FOLDERNAME")
    upload_ledger = reader.flag("SFTP", "UPLOAD_LEDGER", DEFAULT_UPLOAD_LEDGER)
    sftp_retries = reader.number(SFTP_RETRIES)
    keepalive = reader.number(SFTP_KEEPALIVE)
    parallel_uploads = reader.number(PARALLEL_UPLOADS)
    transport = reader.text("SFTP", "TRANSPORT", required=False) or DEFAULT_TRANSPORT
    if transport not in TRANSPORTS:
        reader.problems.append(f"SFTP.TRANSPORT: expected one of {', '.join(map(repr, TRANSPORTS))}, "
                               f"got {transport[:40]!r}")
    key_path = reader.path("SECURITY", "PATH_ENCRYPTION_KEY")
    working_dir = reader.path("MISC", "WORKING_DIR")
    if working_dir is not None and not working_dir.is_dir():
        reader.problems.append(f"MISC.WORKING_DIR: folder {working_dir} does not exist; create it first")
    run_timeout = reader.number(RUN_TIMEOUT)
    known_hosts = reader.path("SFTP", "KNOWN_HOSTS", required=False)
    metrics_file = reader.path("MISC", "METRICS_FILE", required=False)
    log_file = reader.path("MISC", "LOG_FILE", required=False)
    for name, path in (("MISC.METRICS_FILE", metrics_file), ("MISC.LOG_FILE", log_file)):
        if path is not None and not path.parent.is_dir():
            reader.problems.append(f"{name}: folder {path.parent} does not exist; create it first")

    if reader.problems:
        raise ConfigError(str(source), reader.problems)
    assert url and api_key and tag and host and username and folder  # for type checkers
    assert password or private_key
    assert port is not None and timeout is not None and key_path and working_dir
    assert None not in (call_timeout, export_timeout, broker_retries, max_delete_percent, sftp_retries,
                        run_timeout, concurrency, parallel_uploads, keepalive)
    return Config(
        source=source,
        broker=BrokerSettings(url=url.rstrip("/"), api_key=api_key, tag=tag, ca_bundle=ca_bundle,
                              call_timeout=float(call_timeout), export_timeout=float(export_timeout),
                              retries=int(broker_retries), concurrency=int(concurrency)),
        sftp=SftpSettings(host=host, port=int(port), username=username, password=password,
                          timeout=float(timeout), folder=folder.rstrip("/") or "/",
                          known_hosts=known_hosts or working_dir / "known_hosts",
                          upload_ledger=upload_ledger, retries=int(sftp_retries), private_key=private_key,
                          private_key_passphrase=passphrase, parallel_uploads=int(parallel_uploads),
                          transport=transport, keepalive=int(keepalive)),
        key_path=key_path,
        working_dir=working_dir,
        max_delete_percent=float(max_delete_percent),
        max_delete_count=None if max_delete_count is None else int(max_delete_count),
        run_timeout=float(run_timeout),
        metrics_file=metrics_file,
        log_file=log_file,
    )


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at ``path``; return its validated ``Config`` (``environ`` as for ``parse_config``).

    Logs a warning when the file holds a secret and group or others may read it.

    :raises ConfigError: the file is missing, unreadable, not TOML, or has invalid values.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path),
                          ["file not found; check the path given with --config (or in BROKER_SFTP_UPLOADER_CONFIG)"]) from None
    except OSError as error:
        raise ConfigError(str(path), [f"cannot read: {error.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"not valid TOML: {error}"]) from None
    _warn_if_secrets_exposed(path, mode, data)
    return parse_config(data, path, environ)


def _warn_if_secrets_exposed(path: Path, mode: int, data: dict[str, Any]) -> None:
    """Warn when the config file itself holds secrets and group or others may read it."""
    inline = [name for name in _INLINE_SECRETS
              if isinstance(table := data.get(name.split(".")[0]), dict) and name.split(".")[1] in table]
    if not inline:
        return
    movable = [f"{name}_FILE" for name in inline if name in SECRET_VARIABLES]
    advice = f", or move them to {', '.join(movable)} or environment variables" if movable else ""
    if "SMTP.PASSWORD" in inline:
        advice += "; [SMTP] is ignored, so its PASSWORD can go"
    warn_if_exposed(path, mode, f"config file {path} holds secrets ({', '.join(inline)}) and", advice)

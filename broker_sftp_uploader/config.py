"""Read and validate the TOML configuration into frozen settings objects.

The file format is the original script's (sections BROKER, REQUESTS, SFTP, SECURITY, MISC and the
top-level REQUESTS_CA_BUNDLE), so an existing config works unchanged. Every problem is collected
first and reported together in one ``ConfigError``, each naming its key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_sftp_uploader.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

LEDGER_FILE_NAME = "status.xml"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate to it."""

    url: str
    api_key: str = field(repr=False)
    tag: str
    ca_bundle: Path | None = None


@dataclass(frozen=True)
class SftpSettings:
    """The SFTP server, its login and the remote folder for uploads."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    timeout: float
    folder: str
    known_hosts: Path
    upload_ledger: bool = True


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; paths are absolute."""

    source: Path
    broker: BrokerSettings
    sftp: SftpSettings
    key_path: Path
    working_dir: Path

    @property
    def ledger_path(self) -> Path:
        """The state ledger, ``WORKING_DIR/status.xml`` as in the original script."""
        return self.working_dir / LEDGER_FILE_NAME


class _Reader:
    """Takes typed values out of the parsed TOML and remembers every problem on the way."""

    def __init__(self, data: dict[str, Any], base_dir: Path):
        self.data = data
        self.base_dir = base_dir
        self.problems: list[str] = []

    def _raw(self, section: str | None, key: str, required: bool) -> Any:
        name = f"{section}.{key}" if section else key
        table = self.data if section is None else self.data.get(section)
        if not isinstance(table, dict) or key not in table:
            if required:
                self.problems.append(f"{name}: missing")
            return None
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

    def number(self, section: str, key: str, default: float | None, minimum: float, maximum: float,
               integer: bool) -> float | None:
        """A number, also accepted as a numeric string ("25") because the original configs write it so."""
        value = self._raw(section, key, default is None)
        name = f"{section}.{key}"
        if value is None:
            return default
        kind = "a whole number" if integer else "a number"
        parsed: float | None = None
        if isinstance(value, bool):
            parsed = None
        elif isinstance(value, int) or (isinstance(value, float) and not integer):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = int(value.strip()) if integer else float(value.strip())
            except ValueError:
                parsed = None
        if parsed is None:
            self.problems.append(f"{name}: expected {kind}, got {_describe(value)}")
            return None
        if not minimum <= parsed <= maximum:
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


# Known keys per section; None stands for the top level. SMTP belongs to the original script's
# separate error notifier: accepted so old configs load, and otherwise ignored.
_KNOWN_KEYS: dict[str | None, set[str]] = {
    None: {"BROKER", "REQUESTS", "SFTP", "SECURITY", "MISC", "SMTP", "REQUESTS_CA_BUNDLE"},
    "BROKER": {"URL", "API_KEY"},
    "REQUESTS": {"TAG"},
    "SFTP": {"HOST", "PORT", "USERNAME", "PASSWORD", "TIMEOUT", "FOLDERNAME", "KNOWN_HOSTS", "UPLOAD_LEDGER"},
    "SECURITY": {"PATH_ENCRYPTION_KEY"},
    "MISC": {"WORKING_DIR"},
    "SMTP": {"HOST", "USERNAME", "PASSWORD"},
}


def _describe(value: Any) -> str:
    """Name a TOML value's type for an error message without echoing it (it may be a secret)."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "an array"}
    return names.get(type(value), type(value).__name__)


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


def parse_config(data: dict[str, Any], source: Path) -> Config:
    """Given parsed TOML and the file it came from, return a validated ``Config``.

    :raises ConfigError: listing every problem found, each naming its key.
    """
    source = source.resolve()
    reader = _Reader(data, source.parent)
    reader.problems.extend(_unknown_keys(data))

    url = reader.text("BROKER", "URL")
    if url is not None and not url.startswith(("http://", "https://")):
        reader.problems.append("BROKER.URL: must start with http:// or https://")
        url = None
    api_key = reader.text("BROKER", "API_KEY")
    tag = reader.text("REQUESTS", "TAG")
    if tag is not None and "'" in tag:
        reader.problems.append("REQUESTS.TAG: must not contain a single quote (it ends the broker's XPath literal)")
    ca_bundle = reader.path(None, "REQUESTS_CA_BUNDLE", required=False)
    if ca_bundle is not None and not ca_bundle.is_file():
        reader.problems.append(f"REQUESTS_CA_BUNDLE: file {ca_bundle} does not exist")

    host = reader.text("SFTP", "HOST")
    port = reader.number("SFTP", "PORT", 22, 1, 65535, integer=True)
    username = reader.text("SFTP", "USERNAME")
    password = reader.text("SFTP", "PASSWORD")
    timeout = reader.number("SFTP", "TIMEOUT", None, 1, 3600, integer=False)
    folder = reader.text("SFTP", "FOLDERNAME")
    upload_ledger = reader.flag("SFTP", "UPLOAD_LEDGER", True)
    key_path = reader.path("SECURITY", "PATH_ENCRYPTION_KEY")
    working_dir = reader.path("MISC", "WORKING_DIR")
    if working_dir is not None and not working_dir.is_dir():
        reader.problems.append(f"MISC.WORKING_DIR: folder {working_dir} does not exist; create it first")
    known_hosts = reader.path("SFTP", "KNOWN_HOSTS", required=False)

    if reader.problems:
        raise ConfigError(str(source), reader.problems)
    assert url and api_key and tag and host and username and password and folder  # for type checkers
    assert port is not None and timeout is not None and key_path and working_dir
    return Config(
        source=source,
        broker=BrokerSettings(url=url.rstrip("/"), api_key=api_key, tag=tag, ca_bundle=ca_bundle),
        sftp=SftpSettings(host=host, port=int(port), username=username, password=password,
                          timeout=float(timeout), folder=folder.rstrip("/") or "/",
                          known_hosts=known_hosts or working_dir / "known_hosts",
                          upload_ledger=upload_ledger),
        key_path=key_path,
        working_dir=working_dir,
    )


def load_config(path: Path) -> Config:
    """Read the TOML file at ``path`` and return its validated ``Config``.

    :raises ConfigError: the file is missing, unreadable, not TOML, or has invalid values.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; pass --config or set BROKER_SFTP_UPLOADER_CONFIG"]) from None
    except OSError as error:
        raise ConfigError(str(path), [f"cannot read: {error.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"not valid TOML: {error}"]) from None
    return parse_config(data, path)

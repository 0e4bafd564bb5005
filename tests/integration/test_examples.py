"""The deployment files in examples/: the sample config passes the tool's own validation and runs a real
sync, the systemd units pass `systemd-analyze verify`, and config, units and cron line agree."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker_sftp_uploader import config as config_module
from broker_sftp_uploader.config import load_config
from broker_sftp_uploader.crypto import generate_key_file
from test_resources import broker_actors as actors
from test_resources.availability import missing_program
from test_resources.broker_actors import ADMIN_KEY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SAMPLE = EXAMPLES / "sftp-upload.toml"
SERVICE = EXAMPLES / "broker-sftp-uploader.service"
TIMER = EXAMPLES / "broker-sftp-uploader.timer"
CRONTAB = EXAMPLES / "crontab"
CREDENTIALS = "/run/credentials/broker-sftp-uploader.service"
WORKING_DIR = "/var/lib/broker-sftp-uploader"
# `#KEY = value` shows a default; `#KEY = value  # e.g.` an example (see the sample's head).
COMMENTED_KEY = re.compile(r"^#([A-Z_]+) = (.*)$")


def sections(text: str) -> dict[str | None, list[str]]:
    """Lines of a TOML text by section (None: before the first); a commented `# [X]` is no section."""
    found: dict[str | None, list[str]] = {None: []}
    current = None
    for line in text.splitlines():
        header = re.fullmatch(r"\[([A-Z]+)\]", line.strip())
        if header:
            current = header.group(1)
            found[current] = []
        else:
            found[current].append(line)
    return found


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file (comments skipped), each key with all its values."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@dataclasses.dataclass
class Deployed:
    """The sample config copied into a temp folder as an administrator would fill it in."""

    config_path: Path
    credentials: Path
    working_dir: Path
    text: str

    def write(self, text: str) -> Path:
        self.config_path.write_text(text)
        return self.config_path


@pytest.fixture
def deployed(tmp_path) -> Deployed:
    """The sample with its systemd paths moved under tmp_path and the secret files systemd would hand over
    (mode 0400 as LoadCredential= makes them), nothing else changed."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    working_dir = tmp_path / "work"
    working_dir.mkdir(mode=0o700)
    for name, secret in (("api-key", ADMIN_KEY), ("sftp-password", "not-the-real-password")):
        (credentials / name).write_text(secret + "\n")
        (credentials / name).chmod(0o400)
    generate_key_file(credentials / "rki.key")
    (credentials / "rki.key").chmod(0o400)
    text = SAMPLE.read_text()
    assert CREDENTIALS in text and WORKING_DIR in text
    text = text.replace(CREDENTIALS, str(credentials)).replace(WORKING_DIR, str(working_dir))
    config_path = tmp_path / "sftp-upload.toml"
    config_path.write_text(text)
    return Deployed(config_path, credentials, working_dir, text)


# ------------------------------------------------------------------------------------ sample config


def test_sample_config_passes_the_tools_validation_without_a_warning(deployed, caplog):
    with caplog.at_level("WARNING"):
        config = load_config(deployed.config_path, environ={})
    assert [record.getMessage() for record in caplog.records] == []
    assert config.broker.url == "https://broker.example.org"
    assert config.broker.api_key == ADMIN_KEY  # read from the API_KEY_FILE, newline dropped
    assert config.sftp.password == "not-the-real-password"
    assert config.broker.tag == "rki"
    assert config.key_path == deployed.credentials / "rki.key"
    assert config.working_dir == deployed.working_dir
    assert config.sftp.known_hosts == deployed.working_dir / "known_hosts"


def test_sample_config_shows_every_key_the_tool_knows():
    """A key added to config.py without a line in the sample fails here."""
    by_section = sections(SAMPLE.read_text())
    for section, keys in config_module._KNOWN_KEYS.items():
        if section == "SMTP":  # the original's notifier: accepted and ignored, named in a comment only
            continue
        lines = by_section[None] if section is None else by_section.get(section, [])
        for key in keys:
            if section is None and key in config_module._KNOWN_KEYS:
                assert key == "SMTP" or key in by_section, f"no [{key}] section"
                continue
            assert any(re.match(rf"#?{key} = ", line) for line in lines), f"{section}.{key} is not shown"


def test_sample_config_defaults_are_the_tools_defaults(deployed):
    """Uncommenting every line the sample says shows a default must change nothing."""
    original = load_config(deployed.config_path, environ={})
    lines = []
    uncommented = []
    for line in deployed.text.splitlines():
        match = COMMENTED_KEY.match(line)
        if match and "# e.g." not in match.group(2):
            uncommented.append(match.group(1))
            line = line[1:]
        lines.append(line)
    assert len(uncommented) >= 12, uncommented
    with_defaults = load_config(deployed.write("\n".join(lines) + "\n"), environ={})
    assert with_defaults == original


def test_sample_config_ranges_are_the_tools_ranges():
    """A range the sample states in the comment above a key ("(1 to 3600)") is the one config.py enforces."""
    specs = {(spec.section, spec.key): spec for spec in config_module.NUMBER_KEYS}
    stated = []
    for section, lines in sections(SAMPLE.read_text()).items():
        comment = ""
        for line in lines:
            key = re.match(r"^#?([A-Z_]+) = ", line)
            if key and (section, key.group(1)) in specs:
                found = re.search(r"\((\d+) to (\d+)\b", comment)
                if found:
                    spec = specs[section, key.group(1)]
                    assert (float(found.group(1)), float(found.group(2))) == (spec.minimum, spec.maximum), spec.name
                    stated.append(spec.name)
            comment = comment + " " + line if line.startswith("# ") else ""
    assert len(stated) >= 7, stated


def test_sample_config_examples_are_valid_toml():
    """Every `#KEY = value  # e.g.` line, uncommented, is valid TOML of the right section."""
    examples = [line[1:] for line in SAMPLE.read_text().splitlines()
                if COMMENTED_KEY.match(line) and "# e.g." in line]
    assert len(examples) >= 8
    for line in examples:
        tomllib.loads(line)


def test_sample_config_runs_a_real_sync(deployed, broker, sshd, tmp_path):
    """Filled in where it says CHANGE (and PORT), the sample uploads to a real sshd from a broker."""
    folder = f"examples-{os.urandom(3).hex()}"
    remote = sshd.folder(folder)
    (deployed.credentials / "sftp-password").chmod(0o600)
    (deployed.credentials / "sftp-password").write_text(sshd.password + "\n")
    (deployed.credentials / "sftp-password").chmod(0o400)
    text = deployed.text
    for old, new in (('URL = "https://broker.example.org"', f'URL = "{broker.url}"'),
                     ('HOST = "sftp.example.org"', f'HOST = "{sshd.host}"'),
                     ("#PORT = 22", f"PORT = {sshd.port}"),
                     ('USERNAME = "aktin-upload"', f'USERNAME = "{sshd.password_user}"'),
                     ('FOLDERNAME = "rki"', f'FOLDERNAME = "{folder}"')):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    deployed.write(text)
    request_id = actors.publish_completed(broker.url, result=b"a;b\n1;2\n")
    result = subprocess.run([sys.executable, "-m", "broker_sftp_uploader", "sync", "--config",
                             str(deployed.config_path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "CREDENTIALS_DIRECTORY": str(deployed.credentials)})
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in remote.iterdir()) == [f"export_{request_id}.zip", "status.xml"]
    assert (deployed.working_dir / "status.xml").is_file()


# ------------------------------------------------------------------------------------ systemd units


def systemd_analyze() -> str:
    """The systemd-analyze program; missing, it fails the test under CI=true and skips it elsewhere."""
    program = shutil.which("systemd-analyze")
    if program is None:
        missing_program("systemd-analyze", "not installed (Debian: apt-get install systemd)")
    return program


def verify_problems(folder: Path, *names: str) -> list[str]:
    """Run `systemd-analyze verify` on unit files in ``folder``; return what it says about them.

    It exits 0 even for an unknown or misspelt key, which it only reports, so its words count too.
    Lines about other units (the host's own) are not ours to judge.
    """
    result = subprocess.run([systemd_analyze(), "verify", *(str(folder / name) for name in names)],
                            capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "broker-sftp-uploader" in line]
    if result.returncode != 0:
        lines.append(f"systemd-analyze exited {result.returncode}")
    return lines


def install_units(folder: Path) -> None:
    """Copy the units under their own names, ExecStart pointing at this environment's console script
    (verify checks that the program exists); everything else stays as shipped."""
    program = shutil.which("broker-sftp-uploader")
    assert program, "the console script broker-sftp-uploader must be on PATH (the project's .venv/bin)"
    service = SERVICE.read_text()
    shipped = "ExecStart=/usr/local/bin/broker-sftp-uploader "
    assert service.count(shipped) == 1
    (folder / SERVICE.name).write_text(service.replace(shipped, f"ExecStart={program} "))
    shutil.copy(TIMER, folder / TIMER.name)


def test_units_pass_systemd_analyze_verify(tmp_path):
    install_units(tmp_path)
    assert verify_problems(tmp_path, SERVICE.name, TIMER.name) == []


def test_verify_check_catches_a_misspelt_setting(tmp_path):
    """The check above can fail: a typo in a hardening option is reported, not silently ignored."""
    install_units(tmp_path)
    service = tmp_path / SERVICE.name
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    problems = verify_problems(tmp_path, SERVICE.name, TIMER.name)
    assert any("ProtectSytem" in line for line in problems), problems


def test_service_runs_as_a_dedicated_user_hardened_and_stoppable_cleanly():
    settings = unit_settings(SERVICE)
    assert settings["Type"] == ["oneshot"]
    assert settings["User"] == ["aktin"] and settings["Group"] == ["aktin"]
    assert settings["KillMode"] == ["mixed"]  # SIGTERM to the uploader first; ssh children later
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("PrivateDevices", "yes")):
        assert settings[key] == [value], key
    assert settings["ReadWritePaths"] == [WORKING_DIR]


def test_service_loads_every_credential_the_sample_config_reads():
    """Each credential path in the config's active lines is one the service provides, and vice versa."""
    loaded = {value.split(":", 1)[0] for value in unit_settings(SERVICE)["LoadCredential"]}
    active = [line for line in SAMPLE.read_text().splitlines() if not line.startswith("#")]
    read = {match.group(1) for line in active for match in re.finditer(rf'"{re.escape(CREDENTIALS)}/([^"]+)"', line)}
    assert read == loaded == {"api-key", "sftp-password", "rki.key"}
    settings = tomllib.loads(SAMPLE.read_text())
    assert settings["MISC"]["WORKING_DIR"] == WORKING_DIR


def test_timer_runs_the_service_every_30_minutes_and_catches_up():
    settings = unit_settings(TIMER)
    assert settings["OnCalendar"] == ["*:00/30"]
    assert settings["Persistent"] == ["true"]
    assert "RandomizedDelaySec" in settings
    assert settings["WantedBy"] == ["timers.target"]
    result = subprocess.run([systemd_analyze(), "calendar", "--iterations=3", settings["OnCalendar"][0]],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"Normalized form: \*-\*-\* \*:00/30:00", result.stdout), result.stdout


# ------------------------------------------------------------------------- the commands they start


def cron_entries() -> list[list[str]]:
    """Job lines of the cron.d file, each split into 5 time fields, the user and the command."""
    entries = []
    for line in CRONTAB.read_text().splitlines():
        if not line.strip() or line.startswith("#") or re.match(r"[A-Z_]+=", line):
            continue
        fields = line.split(None, 6)
        entries.append(fields)
    return entries


def test_crontab_runs_sync_every_30_minutes_as_the_service_user():
    (entry,) = cron_entries()
    assert entry[:5] == ["*/30", "*", "*", "*", "*"]
    assert entry[5] == unit_settings(SERVICE)["User"][0]


@pytest.mark.parametrize("source", ["service", "crontab"])
def test_the_shipped_command_line_is_one_the_tool_accepts(source, tmp_path):
    """The options in ExecStart= and in the cron line are real: `--help` after them parses them first."""
    if source == "service":
        command = unit_settings(SERVICE)["ExecStart"][0].split()
        assert command[0] == "/usr/local/bin/broker-sftp-uploader"
    else:
        command = cron_entries()[0][6].split()
        assert command[0] == "broker-sftp-uploader"  # found through the crontab's PATH
    assert command[1:] == ["sync", "--config", "/etc/aktin/sftp-upload.toml"]
    result = subprocess.run([sys.executable, "-m", "broker_sftp_uploader", *command[1:], "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage: broker-sftp-uploader sync" in result.stdout

"""`keygen` and `decrypt` through the CLI, with real keys and files; plain Fernet as the oracle."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.crypto import fingerprint


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker_sftp_uploader", *args], cwd=cwd, check=False,
                          capture_output=True, timeout=60)


@pytest.fixture
def keyed(tmp_path):
    """A key made by keygen and a token of a known plaintext made by plain Fernet."""
    result = run("keygen", "rki.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    key = (tmp_path / "rki.key").read_bytes().strip()
    plain = os.urandom(100_000)
    encrypted = tmp_path / "in" / "export_2.zip"
    encrypted.parent.mkdir()
    encrypted.write_bytes(Fernet(key).encrypt(plain))
    return tmp_path, key, plain, encrypted


def test_keygen_writes_0600_key_and_prints_fingerprint(tmp_path):
    result = run("keygen", "new.key", cwd=tmp_path)
    assert result.returncode == 0
    key = (tmp_path / "new.key").read_bytes().strip()
    Fernet(key)  # a valid key
    assert stat.S_IMODE(os.stat(tmp_path / "new.key").st_mode) == 0o600
    assert result.stdout.decode() == (f"wrote a new key to new.key; fingerprint {fingerprint(key)} "
                                      "(compare it with the receiver's)\n")
    assert key not in result.stdout


def test_keygen_never_overwrites(tmp_path):
    (tmp_path / "old.key").write_bytes(b"precious\n")
    result = run("keygen", "old.key", cwd=tmp_path)
    assert result.returncode == 12
    assert b"already exists" in result.stderr
    assert (tmp_path / "old.key").read_bytes() == b"precious\n"


def test_decrypt_to_output_dir(keyed):
    root, _, plain, encrypted = keyed
    (root / "out").mkdir()
    result = run("decrypt", "--key", "rki.key", str(encrypted), "--output-dir", "out", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "out" / "export_2.zip").read_bytes() == plain


def test_decrypt_to_file_and_stdout(keyed):
    root, _, plain, encrypted = keyed
    assert run("decrypt", "-k", "rki.key", "-o", "plain.zip", str(encrypted), cwd=root).returncode == 0
    assert (root / "plain.zip").read_bytes() == plain
    result = run("decrypt", "-k", "rki.key", "-o", "-", str(encrypted), cwd=root)
    assert result.returncode == 0
    assert result.stdout == plain


def test_decrypt_refuses_to_overwrite_its_input(keyed):
    root, _, _, encrypted = keyed
    before = encrypted.read_bytes()
    result = run("decrypt", "-k", str(root / "rki.key"), "export_2.zip", cwd=encrypted.parent)
    assert result.returncode == 12
    assert b"refusing to decrypt export_2.zip onto itself" in result.stderr
    assert encrypted.read_bytes() == before


def test_decrypt_refuses_existing_output_unless_forced(keyed):
    root, _, plain, encrypted = keyed
    (root / "plain.zip").write_bytes(b"keep")
    assert run("decrypt", "-k", "rki.key", "-o", "plain.zip", str(encrypted), cwd=root).returncode == 12
    assert (root / "plain.zip").read_bytes() == b"keep"
    assert run("decrypt", "-k", "rki.key", "-o", "plain.zip", "--force", str(encrypted), cwd=root).returncode == 0
    assert (root / "plain.zip").read_bytes() == plain


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-key", "not-fernet"])
def test_decrypt_bad_input_exits_12_and_leaves_no_output(keyed, damage):
    root, _, _, encrypted = keyed
    token = encrypted.read_bytes()
    if damage == "flip":
        middle = len(token) // 2
        encrypted.write_bytes(token[:middle] + (b"A" if token[middle:middle + 1] != b"A" else b"B")
                              + token[middle + 1:])
    elif damage == "truncate":
        encrypted.write_bytes(token[:-10])
    elif damage == "other-key":
        encrypted.write_bytes(Fernet(Fernet.generate_key()).encrypt(b"secret"))
    else:
        encrypted.write_bytes(b"PK\x03\x04 this is a zip, not a token")
    result = run("decrypt", "-k", "rki.key", "-o", "out.zip", str(encrypted), cwd=root)
    assert result.returncode == 12
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert not (root / "out.zip").exists()
    assert sorted(path.name for path in root.iterdir()) == ["in", "rki.key"]
    stdout_result = run("decrypt", "-k", "rki.key", "-o", "-", str(encrypted), cwd=root)
    assert (stdout_result.returncode, stdout_result.stdout) == (12, b"")


def test_decrypt_with_rotated_keys_file_and_repeated_key_option(keyed):
    root, old_key, plain, encrypted = keyed
    new_key = Fernet.generate_key()
    (root / "rotated.key").write_bytes(b"# new key first, old kept for decrypting\n" + new_key + b"\n" + old_key + b"\n")
    os.chmod(root / "rotated.key", 0o600)
    assert run("decrypt", "-k", "rotated.key", "-o", "a.zip", str(encrypted), cwd=root).returncode == 0
    assert (root / "a.zip").read_bytes() == plain
    (root / "new.key").write_bytes(new_key + b"\n")
    os.chmod(root / "new.key", 0o600)
    assert run("decrypt", "-k", "new.key", "-k", "rki.key", "-o", "b.zip", str(encrypted), cwd=root).returncode == 0
    assert run("decrypt", "-k", "new.key", "-o", "c.zip", str(encrypted), cwd=root).returncode == 12


def test_decrypt_invalid_key_file_exits_12_naming_it(keyed):
    root, _, _, encrypted = keyed
    (root / "bad.key").write_text("definitely-not-a-key\n")
    result = run("decrypt", "-k", "bad.key", "-o", "x.zip", str(encrypted), cwd=root)
    assert result.returncode == 12
    assert b"bad.key" in result.stderr
    assert b"definitely-not-a-key" not in result.stderr


def test_key_file_readable_by_others_gives_a_warning(keyed):
    root, _, _, encrypted = keyed
    os.chmod(root / "rki.key", 0o644)
    result = run("decrypt", "-k", "rki.key", "-o", "x.zip", str(encrypted), cwd=root)
    assert result.returncode == 0
    assert b"chmod 600" in result.stderr


def test_decrypt_usage_errors_exit_2(keyed):
    root, _, _, encrypted = keyed
    assert run("decrypt", "-k", "rki.key", "-o", "x", "-d", ".", str(encrypted), cwd=root).returncode == 2
    assert run("decrypt", "-k", "rki.key", "-o", "x", str(encrypted), str(encrypted), cwd=root).returncode == 2

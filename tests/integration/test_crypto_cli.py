"""`keygen`, `fingerprint` and `decrypt` through the CLI, with real keys and files; plain Fernet as the oracle."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.crypto import key_fingerprint


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
    assert result.stdout.decode() == (f"wrote a new key to new.key; fingerprint {key_fingerprint(key)} "
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


def test_decrypt_in_the_download_folder_writes_beside_the_input(keyed):
    """The receiver's first call: in the folder holding export_2.zip, with no output option."""
    root, _, plain, encrypted = keyed
    before = encrypted.read_bytes()
    result = run("decrypt", "--key", str(root / "rki.key"), "export_2.zip", cwd=encrypted.parent)
    assert result.returncode == 0, result.stderr
    assert (encrypted.parent / "export_2.decrypted.zip").read_bytes() == plain
    assert encrypted.read_bytes() == before
    assert sorted(path.name for path in encrypted.parent.iterdir()) == ["export_2.decrypted.zip", "export_2.zip"]


def test_decrypt_from_elsewhere_writes_beside_the_input_not_into_the_current_folder(keyed):
    root, _, plain, _ = keyed
    result = run("decrypt", "-k", "rki.key", "in/export_2.zip", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "in" / "export_2.decrypted.zip").read_bytes() == plain
    assert sorted(path.name for path in root.iterdir()) == ["in", "rki.key"]


def test_decrypt_output_dir_is_created_with_parents(keyed):
    root, _, plain, encrypted = keyed
    result = run("decrypt", "-k", "rki.key", str(encrypted), "--output-dir", "new/plain/", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "new" / "plain" / "export_2.zip").read_bytes() == plain
    # Plaintext is health data: the folder made for it is private, like the 0600 files in it.
    assert stat.S_IMODE((root / "new" / "plain").stat().st_mode) == 0o700


def test_decrypt_output_dir_that_is_the_input_folder_uses_the_decrypted_name(keyed):
    root, _, plain, encrypted = keyed
    result = run("decrypt", "-k", str(root / "rki.key"), "export_2.zip", "-d", ".", cwd=encrypted.parent)
    assert result.returncode == 0, result.stderr
    assert (encrypted.parent / "export_2.decrypted.zip").read_bytes() == plain


def test_decrypt_output_dir_that_is_a_file_exits_16(keyed):
    root, _, _, encrypted = keyed
    (root / "taken").write_bytes(b"a file")
    result = run("decrypt", "-k", "rki.key", str(encrypted), "-d", "taken", cwd=root)
    assert result.returncode == 16, result.stderr
    assert b"taken" in result.stderr
    assert (root / "taken").read_bytes() == b"a file"


def test_decrypt_onto_its_own_input_exits_16(keyed):
    root, _, _, encrypted = keyed
    before = encrypted.read_bytes()
    result = run("decrypt", "-k", str(root / "rki.key"), "-o", "export_2.zip", "--force", "export_2.zip",
                 cwd=encrypted.parent)
    assert result.returncode == 16
    assert b"refusing to decrypt export_2.zip onto itself" in result.stderr
    assert encrypted.read_bytes() == before


def test_decrypt_existing_default_output_exits_16_not_12(keyed):
    root, _, plain, encrypted = keyed
    target = encrypted.parent / "export_2.decrypted.zip"
    target.write_bytes(b"keep")
    result = run("decrypt", "-k", "rki.key", str(encrypted), cwd=root)
    assert result.returncode == 16
    assert result.stderr.decode().startswith("Error: ") and "--force" in result.stderr.decode()
    assert target.read_bytes() == b"keep"
    assert run("decrypt", "-k", "rki.key", str(encrypted), "--force", cwd=root).returncode == 0
    assert target.read_bytes() == plain


def test_decrypt_refuses_existing_output_unless_forced(keyed):
    root, _, plain, encrypted = keyed
    (root / "plain.zip").write_bytes(b"keep")
    assert run("decrypt", "-k", "rki.key", "-o", "plain.zip", str(encrypted), cwd=root).returncode == 16
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


def test_several_files_each_done_and_a_bad_one_wins_over_an_existing_output(keyed):
    root, key, _, encrypted = keyed
    folder = encrypted.parent
    other = os.urandom(5000)
    (folder / "export_4.zip").write_bytes(Fernet(key).encrypt(other))
    (folder / "export_6.zip").write_bytes(Fernet(Fernet.generate_key()).encrypt(b"not for us"))
    (folder / "export_2.decrypted.zip").write_bytes(b"keep")
    result = run("decrypt", "-k", str(root / "rki.key"), "export_2.zip", "export_4.zip", "export_6.zip",
                 cwd=folder)
    assert result.returncode == 12
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 2 and "export_2.decrypted.zip already exists" in lines[0] and "export_6.zip" in lines[1]
    assert (folder / "export_4.decrypted.zip").read_bytes() == other
    assert (folder / "export_2.decrypted.zip").read_bytes() == b"keep"
    assert not (folder / "export_6.decrypted.zip").exists()
    (folder / "export_6.zip").unlink()
    result = run("decrypt", "-k", str(root / "rki.key"), "export_2.zip", "export_4.zip", cwd=folder)
    assert result.returncode == 16


# ---------------------------------------------------------------------------------------- fingerprint


def keygen_fingerprint(root: Path, name: str) -> str:
    result = run("keygen", name, cwd=root)
    assert result.returncode == 0, result.stderr
    return re.search(r"fingerprint ([0-9a-f]{8}) ", result.stdout.decode()).group(1)


def test_fingerprint_prints_what_keygen_printed(tmp_path):
    printed = keygen_fingerprint(tmp_path, "rki.key")
    result = run("fingerprint", "rki.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{printed}\n"
    assert result.stderr == b""


def test_fingerprint_prints_one_line_per_key_in_file_order(tmp_path):
    new, old = keygen_fingerprint(tmp_path, "new.key"), keygen_fingerprint(tmp_path, "old.key")
    rotated = tmp_path / "rki.key"
    rotated.write_bytes(b"# new first\n" + (tmp_path / "new.key").read_bytes() + b"\n"
                        + (tmp_path / "old.key").read_bytes())
    rotated.chmod(0o600)
    result = run("fingerprint", "rki.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [new, old]


# The shell one-liners the README gives for checking a fingerprint without this tool.
ONE_LINER_SINGLE = "head -n1 rki.key | tr -d '\\n' | sha256sum | cut -c1-8"
ONE_LINER_EVERY = ("grep -Ev '^[[:space:]]*(#|$)' rki.key | tr -d '\\r' | "
                   "while read -r key; do printf %s \"$key\" | sha256sum | cut -c1-8; done")


def bash(command: str, cwd: Path) -> str:
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=cwd, check=True,
                            capture_output=True, text=True, timeout=60)
    return result.stdout


def test_readme_one_liner_reproduces_the_fingerprint_of_a_keygen_key(tmp_path):
    printed = keygen_fingerprint(tmp_path, "rki.key")
    assert bash(ONE_LINER_SINGLE, tmp_path) == f"{printed}\n"
    assert bash(ONE_LINER_EVERY, tmp_path) == f"{printed}\n"
    # and it is not what a plain `sha256sum rki.key` gives (the file's newline is not part of the key)
    assert not bash("sha256sum rki.key", tmp_path).startswith(printed)


def test_readme_one_liner_for_every_key_matches_on_a_hand_edited_file(tmp_path):
    keys = [Fernet.generate_key() for _ in range(3)]
    # comments, blank lines, indentation and Windows line ends, all of which load_keys accepts
    (tmp_path / "rki.key").write_bytes(b"# rotated 2024-05\r\n\r\n  " + keys[0] + b"\r\n\t" + keys[1]
                                       + b"  \r\n# old\r\n" + keys[2])
    (tmp_path / "rki.key").chmod(0o600)
    result = run("fingerprint", "rki.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [key_fingerprint(key) for key in keys]
    assert bash(ONE_LINER_EVERY, tmp_path) == result.stdout.decode()


@pytest.mark.parametrize("content", [b"definitely-not-a-key\n", b"", b"# only a comment\n"])
def test_fingerprint_of_a_bad_key_file_exits_12_naming_it_not_its_content(tmp_path, content):
    (tmp_path / "bad.key").write_bytes(content)
    (tmp_path / "bad.key").chmod(0o600)
    result = run("fingerprint", "bad.key", cwd=tmp_path)
    assert result.returncode == 12
    assert result.stdout == b""
    assert result.stderr.startswith(b"Error: ") and b"bad.key" in result.stderr
    assert b"definitely-not-a-key" not in result.stderr


def test_fingerprint_of_a_missing_file_exits_12(tmp_path):
    result = run("fingerprint", "absent.key", cwd=tmp_path)
    assert result.returncode == 12
    assert b"absent.key" in result.stderr


def test_fingerprint_never_prints_the_key(tmp_path):
    keygen_fingerprint(tmp_path, "rki.key")
    key = (tmp_path / "rki.key").read_bytes().strip()
    (tmp_path / "rki.key").chmod(0o644)  # also through the loose-permission warning
    result = run("fingerprint", "rki.key", cwd=tmp_path)
    assert result.returncode == 0
    assert b"chmod 600" in result.stderr
    assert key not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(("command", "example"), [
    ("keygen", "broker-sftp-uploader keygen /etc/aktin/rki.key"),
    ("fingerprint", "broker-sftp-uploader fingerprint rki.key"),
    ("decrypt", "broker-sftp-uploader decrypt --key rki.key export_2.zip"),
])
def test_help_shows_an_example_unwrapped(tmp_path, command, example):
    result = run(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert any(line.strip().startswith("Example") for line in lines)
    assert any(line.strip().startswith(example) for line in lines), result.stdout.decode()


def test_decrypt_help_documents_where_the_output_goes_and_every_exit_code(tmp_path):
    text = " ".join(run("decrypt", "--help", cwd=tmp_path).stdout.decode().split())
    assert "export_2.decrypted.zip" in text
    for line in ("0 every FILE decrypted", "2 usage", "12 ", "16 "):
        assert line in text, line

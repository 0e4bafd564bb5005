"""Our Fernet files against a Fernet implementation no one here wrote: rfernet (Rust's ``fernet`` crate,
from PyPI; it takes and gives tokens as text). A receiver may decrypt with any implementation of the spec,
not only with Python's cryptography."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import pytest
import rfernet

from broker_sftp_uploader.crypto import encrypt_stream, encrypted_size
from test_resources import broker_actors as actors

SIZES = [0, 1, 15, 16, 17, 4095, 4096, 4097, 3 * 1024 * 1024 + 5]


@pytest.fixture(scope="module")
def key() -> bytes:
    return rfernet.Fernet.generate_new_key().encode()


@pytest.mark.parametrize("size", SIZES)
def test_our_streamed_token_decrypts_with_rfernet(key, size):
    plain = os.urandom(size)
    token = io.BytesIO()
    written = encrypt_stream(key, io.BytesIO(plain), token, chunk_size=4096)
    assert written == len(token.getvalue()) == encrypted_size(size)
    assert rfernet.Fernet(key.decode()).decrypt(token.getvalue().decode()) == plain


def test_a_tampered_token_of_ours_is_refused_by_rfernet(key):
    token = io.BytesIO()
    encrypt_stream(key, io.BytesIO(b"a;b\n1;2\n"), token)
    tampered = bytearray(token.getvalue())
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(rfernet.DecryptionError):
        rfernet.Fernet(key.decode()).decrypt(bytes(tampered).decode())


def test_decrypt_command_reads_an_rfernet_token(key, tmp_path):
    plain = os.urandom(100_000)
    (tmp_path / "rki.key").write_bytes(key + b"\n")
    (tmp_path / "rki.key").chmod(0o600)
    (tmp_path / "export_7.zip").write_text(rfernet.Fernet(key.decode()).encrypt(plain))
    result = subprocess.run([sys.executable, "-m", "broker_sftp_uploader", "decrypt", "--key", "rki.key",
                             "export_7.zip"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "export_7.decrypted.zip").read_bytes() == plain


def test_a_synced_file_on_the_server_decrypts_with_rfernet(broker, workspace):
    actors.publish_completed(broker.url, result=b"a;b\n1;2\n")
    assert workspace.sync().returncode == 0
    key = workspace.key_path.read_bytes().split()[0].decode()
    bundle = rfernet.Fernet(key).decrypt((workspace.remote / "export_0.zip").read_text())
    assert zipfile.is_zipfile(io.BytesIO(bundle))

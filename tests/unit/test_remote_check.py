"""Unit tests for comparing the server's folder with the ledger."""

import io

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.crypto import encrypted_size, is_possible_token_size
from broker_sftp_uploader.state.ledger import LedgerEntry
from broker_sftp_uploader.engine.audit import compare_remote


def entry(request_id, deleted=None, name=None, size=None):
    return LedgerEntry(request_id, "1.0", "2021-10-11 09:39:50", None, deleted, name, size)


@pytest.mark.parametrize("plain", [0, 1, 15, 16, 17, 1000, 65536, 10**6])
def test_is_possible_token_size_accepts_every_real_token(plain):
    token = Fernet(Fernet.generate_key()).encrypt(b"x" * plain)
    assert len(token) == encrypted_size(plain)
    assert is_possible_token_size(len(token))


def test_possible_token_sizes_are_exactly_the_sizes_tokens_have():
    """One arithmetic: the audit's judgement and the encryptor's size agree on every size up to a limit."""
    limit = encrypted_size(5000)
    real = {encrypted_size(plain) for plain in range(5000)}
    assert {size for size in range(-4, limit + 1) if is_possible_token_size(size)} == real


def test_is_possible_token_size_refuses_most_truncations():
    real = encrypted_size(10_000)
    refused = sum(not is_possible_token_size(size) for size in range(real - 200, real))
    assert refused >= 190
    assert not is_possible_token_size(0) and not is_possible_token_size(3)


def test_compare_remote_finds_missing_wrong_size_and_unowned():
    entries = {
        "0": entry("0"),                                   # missing
        "1": entry("1", size=120),                         # recorded size differs
        "2": entry("2"),                                   # no recorded size, impossible token size
        "3": entry("3", size=encrypted_size(5)),           # fine
        "4": entry("4", deleted="2021-10-12 00:00:00"),    # deleted: its absence is right
        "5": entry("5", name="bundle.zip"),                # legacy name, present and plausible
    }
    files = {"export_1.zip": 100, "export_2.zip": 101, "export_3.zip": encrypted_size(5),
             "bundle.zip": encrypted_size(9), "status.xml": 42, "stray.txt": 7, ".export_9.zip.part-0123456789ab": 3}
    comparison = compare_remote(entries, files)
    assert comparison.missing == (("0", "export_0.zip"),)
    assert [(wrong.request_id, wrong.expected) for wrong in comparison.wrong_size] == [("1", 120), ("2", None)]
    assert comparison.unowned == ("stray.txt",)
    assert comparison.needs_repair == ("0", "1", "2")
    assert not comparison.clean


def test_compare_remote_clean_folder():
    token = io.BytesIO(Fernet(Fernet.generate_key()).encrypt(b"abc")).getvalue()
    comparison = compare_remote({"7": entry("7", size=len(token))}, {"export_7.zip": len(token), "status.xml": 1})
    assert comparison.clean and comparison.needs_repair == ()

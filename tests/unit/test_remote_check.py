"""Unit tests for comparing the server's folder with the ledger, and for the delivery proof's judgement of
tokens and its parallel reading (over fake sessions: real ones in tests/integration/test_status.py)."""

import io
import threading

import pytest
from cryptography.fernet import Fernet

from broker_sftp_uploader.concurrency import Cancellation
from broker_sftp_uploader.crypto import encrypted_size, is_possible_token_size, key_fingerprint
from broker_sftp_uploader.engine.audit import (CLOCK_SKEW, compare_remote, files_to_prove, judge_token,
                                               prove_delivery)
from broker_sftp_uploader.errors import SftpError
from broker_sftp_uploader.state.ledger import LedgerEntry


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


# --- the delivery proof (status --remote --verify): judging tokens and reading them on parallel sessions ---

NOW = 1_800_000_000


def chunks_of(data: bytes, size: int = 10):
    return (data[start:start + size] for start in range(0, len(data), size))


def test_judge_token_passes_a_good_token_in_pieces_and_names_every_problem():
    current, older, stranger = (Fernet.generate_key() for _ in range(3))
    token = Fernet(current).encrypt_at_time(b"result" * 100, NOW)
    assert judge_token([current, older], chunks_of(token), "1", "export_1.zip", now=NOW) is None

    tampered = token[:50] + (b"A" if token[50:51] != b"A" else b"B") + token[51:]
    assert judge_token([current], chunks_of(tampered), "1", "f", now=NOW).problem == "no_key"
    assert judge_token([current], chunks_of(token[:-40]), "1", "f", now=NOW).problem == "malformed"
    foreign = Fernet(stranger).encrypt_at_time(b"result", NOW)
    assert judge_token([current, older], chunks_of(foreign), "1", "f", now=NOW).problem == "no_key"

    by_older = Fernet(older).encrypt_at_time(b"r", NOW)
    old = judge_token([current, older], chunks_of(by_older), "1", "f", now=NOW)
    assert (old.problem, old.key) == ("other_key", key_fingerprint(older))
    assert key_fingerprint(current) in old.detail


def test_a_token_from_the_future_fails_beyond_the_clock_skew():
    key = Fernet.generate_key()
    at_the_edge = Fernet(key).encrypt_at_time(b"r", NOW + CLOCK_SKEW)
    assert judge_token([key], [at_the_edge], "1", "f", now=NOW) is None
    beyond = judge_token([key], [Fernet(key).encrypt_at_time(b"r", NOW + CLOCK_SKEW + 1)], "1", "f", now=NOW)
    assert beyond.problem == "future"
    assert f"{CLOCK_SKEW + 1} s in the future" in beyond.detail
    long_ago = Fernet(key).encrypt_at_time(b"r", 0)
    assert judge_token([key], [long_ago], "1", "f", now=NOW) is None  # old is fine


def test_a_read_that_fails_is_that_files_finding():
    def failing():
        yield b"gAAAAA"
        raise SftpError("cannot read f on server: Permission denied")

    failed = judge_token([Fernet.generate_key()], failing(), "4", "f", now=NOW)
    assert (failed.request_id, failed.problem) == ("4", "unreadable")
    assert failed.detail == "cannot read f on server: Permission denied"


def test_files_to_prove_are_the_live_entries_present_in_the_folder():
    entries = {"1": entry("1", name="a.zip"), "2": entry("2", deleted="2021-10-12 00:00:00", name="b.zip"),
               "10": entry("10", name="c.zip"), "3": entry("3", name="gone.zip")}
    files = {"a.zip": 120, "b.zip": 12, "c.zip": 240, "stray": 1}
    assert files_to_prove(entries, files) == [("1", "a.zip", 120), ("10", "c.zip", 240)]


class FakeSessions:
    """Sessions over an in-memory folder, counting how many are open at once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.lock = threading.Lock()
        self.opened = self.open_now = self.most_at_once = 0

    def open(self):
        with self.lock:
            self.opened += 1
            self.open_now += 1
            self.most_at_once = max(self.most_at_once, self.open_now)
        return FakeSession(self)


class FakeSession:
    def __init__(self, sessions: FakeSessions):
        self.sessions = sessions

    def read_chunks(self, name: str, size: int):
        return chunks_of(self.sessions.files[name][:size], 1000)

    def close(self):
        with self.sessions.lock:
            self.sessions.open_now -= 1


def test_prove_delivery_uses_at_most_the_bound_of_sessions_and_closes_them_all():
    key = Fernet.generate_key()
    files = {f"export_{number}.zip": Fernet(key).encrypt(b"r" * 5000) for number in range(12)}
    files["export_5.zip"] = files["export_5.zip"][:-8]
    sessions = FakeSessions(files)
    names = [f"export_{number}.zip" for number in range(12)]
    targets = [(str(number), name, len(files[name])) for number, name in enumerate(names)]
    proof = prove_delivery([key], targets, sessions.open, workers=3)
    assert (proof.checked, proof.verified) == (12, 11)
    assert [(failed.request_id, failed.problem) for failed in proof.failed] == [("5", "malformed")]
    assert 1 <= sessions.opened <= 3
    assert sessions.most_at_once <= 3
    assert sessions.open_now == 0


def test_prove_delivery_fails_whole_when_no_session_opens():
    def refused():
        raise SftpError("cannot open another SFTP session on server: refused")

    with pytest.raises(SftpError, match="cannot open another SFTP session"):
        prove_delivery([Fernet.generate_key()], [("1", "a", 10), ("2", "b", 10)], refused, workers=2)


def test_a_large_file_is_left_as_soon_as_the_proof_is_cancelled():
    """The deadline or an interrupt stops a read between two windows, and its reason comes out."""
    key = Fernet.generate_key()
    cancellation = Cancellation()
    windows = []

    class Endless:
        def read_chunks(self, name, size):
            while True:
                windows.append(name)
                if len(windows) >= 3:
                    cancellation.cancel(SftpError("the run reached its time limit"))
                yield b"gAAAAAAA" * 100

        def close(self):
            pass

    for workers in (1, 2):
        windows.clear()
        cancellation = Cancellation()
        with pytest.raises(SftpError, match="time limit"):
            prove_delivery([key], [("1", "big", 10**12), ("2", "big2", 10**12)], Endless, workers,
                           cancellation)
        assert len(windows) <= 3 + workers


def test_files_larger_than_recorded_are_not_read_but_truncated_ones_are():
    entries = {"1": entry("1", name="a.zip", size=100), "2": entry("2", name="b.zip", size=100),
               "3": entry("3", name="c.zip")}
    files = {"a.zip": 10**12, "b.zip": 60, "c.zip": 10**6}
    assert files_to_prove(entries, files) == [("2", "b.zip", 60), ("3", "c.zip", 10**6)]

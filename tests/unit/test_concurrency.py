"""The one concurrency idiom: a Cancellation (first reason wins, callbacks cut blocked work), thread pools
that stop with it, results in order, the first failure re-raised, and nothing left running behind."""

from __future__ import annotations

import threading
import time

import pytest

from broker_sftp_uploader.concurrency import Cancellation, Cancelled, Workers, in_background, map_in_threads

# A worker that waits for a cancellation gives up after this long: a test whose cancellation never came
# fails instead of hanging.
LIMIT = 30.0


def test_the_first_reason_wins_and_callbacks_run_once():
    cancellation = Cancellation()
    calls = []
    cancellation.on_cancel(lambda: calls.append("cut"))
    first, second = KeyboardInterrupt(), RuntimeError("later")
    assert not cancellation.is_set() and cancellation.reason is None
    assert cancellation.cancel(first) is True
    assert cancellation.cancel(second) is False
    assert cancellation.reason is first and cancellation.is_set()
    assert calls == ["cut"]
    cancellation.on_cancel(lambda: calls.append("late"))  # registered after: runs at once
    assert calls == ["cut", "late"]


def test_a_failing_callback_does_not_keep_the_others_from_running():
    cancellation = Cancellation()
    ran = []

    def broken():
        raise OSError("already closed")

    cancellation.on_cancel(broken)
    cancellation.on_cancel(lambda: ran.append(True))
    cancellation.cancel(ValueError("stop"))
    assert ran == [True]


def test_a_passed_deadline_counts_as_cancelled_with_its_reason():
    cancellation = Cancellation(time.monotonic() - 1, expired=lambda: TimeoutError("the run's time is up"))
    cut = []
    cancellation.on_cancel(lambda: cut.append(True))
    assert cancellation.is_set()
    assert str(cancellation.reason) == "the run's time is up" and cut == [True]
    with pytest.raises(Cancelled) as raised:
        cancellation.check()
    assert raised.value.reason is cancellation.reason
    assert Cancellation(time.monotonic() + 3600).reason is None


def test_a_plain_cancel_has_a_reason_too():
    cancellation = Cancellation()
    cancellation.cancel()
    assert isinstance(cancellation.reason, Cancelled)


def test_wait_and_sleep_end_when_another_thread_cancels():
    cancellation = Cancellation()
    seen = []
    sleeper = threading.Thread(target=lambda: seen.append(_sleep_outcome(cancellation)))
    sleeper.start()
    cancellation.cancel(KeyboardInterrupt())
    assert cancellation.wait(LIMIT) is True
    sleeper.join(LIMIT)
    assert seen == ["cancelled"]


def _sleep_outcome(cancellation: Cancellation) -> str:
    try:
        cancellation.sleep(LIMIT)
    except Cancelled:
        return "cancelled"
    return "slept"


def test_map_in_threads_keeps_the_order_on_many_threads():
    names = set()

    def double(number: int) -> int:
        names.add(threading.current_thread().name)
        return number * 2

    assert map_in_threads(double, list(range(500)), 8, name="status") == [number * 2 for number in range(500)]
    assert names and all(name.startswith("status") for name in names)
    assert threading.current_thread().name not in names


def test_map_in_threads_with_one_worker_runs_in_this_thread():
    names = []

    def note(item: int) -> int:
        names.append(threading.current_thread().name)
        return item

    assert map_in_threads(note, [1, 2], 1) == [1, 2]
    assert names == [threading.current_thread().name] * 2


def test_the_first_failure_is_raised_and_no_call_starts_after_it():
    cancellation = Cancellation()
    started = []
    lock = threading.Lock()

    def call(number: int) -> int:
        with lock:
            started.append(number)
        if number == 0:
            raise LookupError("request 0 is gone")
        cancellation.wait(LIMIT)  # the others are busy until the failure cancels them
        return number

    with pytest.raises(LookupError, match="request 0 is gone"):
        map_in_threads(call, list(range(1000)), 2, cancellation)
    assert isinstance(cancellation.reason, LookupError)
    assert sorted(started) in ([0], [0, 1])  # the other thread's call in flight, and nothing after it


def test_a_cancellation_from_outside_stops_the_calls_and_is_raised():
    cancellation = Cancellation()

    def call(number: int) -> int:
        if number == 3:
            cancellation.cancel(KeyboardInterrupt())
        return number

    with pytest.raises(KeyboardInterrupt):
        map_in_threads(call, list(range(1000)), 4, cancellation)
    already = Cancellation()
    already.cancel(TimeoutError("late"))
    with pytest.raises(TimeoutError):
        map_in_threads(call, [1, 2], 1, already)


def test_leaving_the_block_by_an_exception_cancels_and_waits_for_the_calls_in_flight():
    cancellation = Cancellation()
    in_flight = threading.Barrier(3)
    stopped = []

    def call(number: int) -> int:
        in_flight.wait(LIMIT)
        stopped.append(cancellation.wait(LIMIT))  # as an upload stops between two writes
        return number

    with pytest.raises(KeyboardInterrupt):
        with Workers(call, list(range(10)), 2, cancellation, name="upload") as work:
            in_flight.wait(LIMIT)  # both calls are running
            raise KeyboardInterrupt  # as the signal handler does in the main thread
    assert isinstance(cancellation.reason, KeyboardInterrupt)
    assert stopped == [True, True]  # both saw the cancellation, and were waited for
    assert sorted(work.arrived_meanwhile()) == [0, 1]
    assert work.not_started() == list(range(2, 10))


def test_a_failing_call_cancels_the_others_and_batches_end():
    cancellation = Cancellation()

    def call(number: int) -> int:
        if number == 5:
            raise RuntimeError("a bug")
        return number

    with Workers(call, list(range(5000)), 3, cancellation, name="upload") as work:
        done = [result for batch in work.batches() for result in batch]
    assert isinstance(cancellation.reason, RuntimeError)
    # Every item was done, or was the failing one, or was never started: none is lost or done twice.
    assert sorted(done + [5] + work.not_started()) == list(range(5000))


def test_a_batch_being_handled_when_the_block_is_left_comes_again():
    """At least once: a batch whose handling an interrupt cut short is in arrived_meanwhile."""
    cancellation = Cancellation()
    with pytest.raises(KeyboardInterrupt):
        with Workers(lambda number: number, [7], 1, cancellation, name="upload") as work:
            for batch in work.batches():
                assert batch == [7]
                raise KeyboardInterrupt
    assert work.arrived_meanwhile() == [7]


def test_in_background_hands_over_the_result_or_the_error():
    assert in_background(lambda: 42, name="login").result(LIMIT) == 42

    def refused():
        raise PermissionError("login refused")

    with pytest.raises(PermissionError, match="login refused"):
        in_background(refused, name="login").result(LIMIT)

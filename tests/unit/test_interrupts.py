"""The interrupt handler: a signal is held back inside ``deferred()`` and raised when it ends."""

from __future__ import annotations

import os
import signal
import time

import pytest

from broker_sftp_uploader import interrupts


def send_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_inside_deferred_is_raised_when_the_block_ends(signal_handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        send_sigterm()
        steps.append("finished the call")
    assert steps == ["finished the call"]


def test_nested_deferral_raises_only_at_the_outermost_end(signal_handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        with interrupts.deferred():
            send_sigterm()
        steps.append("outer block went on")
    assert steps == ["outer block went on"]


def test_a_second_signal_is_raised_at_once(signal_handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        send_sigterm()
        steps.append("first held back")
        send_sigterm()
        steps.append("not reached")
    assert steps == ["first held back"]


def test_outside_deferral_a_signal_raises_at_once_and_sigint_is_handled_alike(signal_handlers):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    with interrupts.deferred():
        pass  # nothing pending is left over from the signal above

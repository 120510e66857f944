"""GracefulStop: the first SIGINT/SIGTERM is recorded, the second aborts, the old handlers come back."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from pipeline.common.interrupts import GracefulStop


def _send(signum: int) -> None:
    """Deliver `signum` to the main thread and give Python the chance to run its handler. (A signal
    sent to the process may land on another thread, e.g. a pool a Keras fit left behind; then the
    handler runs only at the main thread's next check, possibly after the test's `with` block.)"""
    signal.pthread_kill(threading.main_thread().ident, signum)
    time.sleep(0.01)


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_the_first_signal_is_recorded(signum, code, name):
    with GracefulStop() as stop:
        assert stop.requested is None and stop.exit_code() == 0
        _send(signum)
        assert stop.requested == signum and stop.exit_code() == code and stop.signal_name() == name


def test_a_second_sigint_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt), GracefulStop() as stop:
        _send(signal.SIGINT)
        _send(signal.SIGINT)
    assert stop.requested == signal.SIGINT


def test_a_second_sigterm_exits_with_143():
    with pytest.raises(SystemExit) as exc, GracefulStop():
        _send(signal.SIGTERM)
        _send(signal.SIGTERM)
    assert exc.value.code == 143


def test_the_previous_handlers_come_back():
    original = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with GracefulStop():
            assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        assert {s: signal.getsignal(s) for s in before} == before
        with pytest.raises(KeyboardInterrupt):  # the default SIGINT handler again
            _send(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, original)


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def enter():
        with GracefulStop() as stop:
            seen["handler"], seen["requested"] = signal.getsignal(signal.SIGINT), stop.requested

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}

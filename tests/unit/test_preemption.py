"""The stop-signal flag of luffy-train (utils/preemption.py): SIGUSR1/SIGTERM are recorded, not acted on,
further signals are ignored, and the previous handlers come back. The trainer's use of it (checkpoint, exit
code, resume) is tested on a real run in tests/e2e/test_fault_matrix.py and under Slurm in test_slurm.py."""

import os
import signal
import threading

import pytest

from luffy_megatron.utils.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, Preempted, StopSignals


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_is_recorded_and_the_process_keeps_running(sig, caplog):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = StopSignals.install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # delivered to the main thread before os.kill returns to Python code
        assert stop.requested and stop.signal_name == sig.name
        other = signal.SIGTERM if sig == signal.SIGUSR1 else signal.SIGUSR1
        os.kill(os.getpid(), other)  # a second signal while stopping: ignored, the first one is kept
        os.kill(os.getpid(), sig)
        assert stop.signal_name == sig.name
    finally:
        stop.uninstall()
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    messages = [r.getMessage() for r in caplog.records]
    assert any("stopping at the end of the current step" in m for m in messages)
    assert sum("ignored" in m for m in messages) == 2


def test_outside_the_main_thread_nothing_is_installed():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stop", StopSignals.install()))
    t.start()
    t.join(10)
    assert not result["stop"].requested
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_the_stop_message_and_exit_code():
    err = Preempted("SIGUSR1", 3, "/out/checkpoints/step_000003")
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128  # not an error, not a signal death
    assert "after step 3" in str(err) and "step_000003" in str(err) and str(PREEMPTED_EXIT_CODE) in str(err)

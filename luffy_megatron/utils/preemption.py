"""Checkpoint-on-signal for `luffy-train`: SIGUSR1 or SIGTERM asks the run to stop at the next safe point.

The handler only records the request. The training loop looks at it between steps (after the previous step's
update, logging and any scheduled checkpoint), writes a checkpoint unless that step is saved already, and
stops; `luffy-train` then exits with `PREEMPTED_EXIT_CODE`, and running the same command again resumes at the
next step with the same data position (`trainer.resume=auto`). Signals that arrive while stopping are logged
and ignored; a checkpoint is renamed into place only once complete, so even a SIGKILL during the save leaves
the previous one intact.

Slurm: the launchers in `slurm/` ask for `--signal=B:USR1@<seconds>`, forward it to `luffy-train` and requeue
the job when it exits with this code.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("luffy.trainer")

# EX_TEMPFAIL (sysexits.h): "temporary failure, try again". Distinct from 0 (done), 1 (error), 2 (bad config).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The run stopped early on a signal; its state is in the checkpoint of `step`."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; "
            f"run the same command again to resume (exit code {PREEMPTED_EXIT_CODE})"
        )


class StopSignals:
    """Install with `StopSignals.install()` (in the main thread; after `ray.init`, which sets its own SIGTERM
    handler), read `requested` at safe points, `uninstall()` to put the previous handlers back."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> "StopSignals":
        stop = cls()
        if threading.current_thread() is not threading.main_thread():
            log.warning("luffy-train runs outside the main thread: SIGUSR1/SIGTERM will not checkpoint before exiting")
            return stop
        for sig in STOP_SIGNALS:
            stop._previous[sig] = signal.signal(sig, stop._handle)
        return stop

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "-"

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping at the end of the current step, after writing a checkpoint", name)
        else:
            log.warning(
                "%s received while already stopping (on %s): ignored, the checkpoint is being written",
                name,
                self.signal_name,
            )

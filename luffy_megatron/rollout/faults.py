"""Engine failures, as the trainer meets them: engines that die or hang during generation or a weight sync.
Nothing waits without a bound, and every failure names what failed (the ranks' side: `cluster/supervision.py`).

* `EngineFailure`: engine i of the fleet died (its Ray actor, or vLLM's engine-core process) or did not answer
  within `rollout.request_timeout_s`. The message names the engine, its node and pids, the phase, the cause
  and the last lines of the engine's log (`<output_dir>/logs/workers/engine_<i>.log`, where the engine actor
  and its vLLM processes write).
* `EngineSupervisor`: the trainer's door to the engines. Generation and syncs with deadlines; on a failure
  either the `EngineFailure` (rollout.on_engine_failure=fail) or, with `restart`, the engine is started again
  in its placement bundle, re-synced from the actor, labelled with the actor's weight version, and its rows
  are generated again (each engine is restarted at most once per call; `restarts` counts them).

The trainer (`train/progress.py`) writes a checkpoint of the healthy actor before it reports an engine failure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import ray  # the engines are Ray actors: this module is only imported where Ray runs

from luffy_megatron.cluster.supervision import (
    DRAIN_TIMEOUT_S,
    GuardedRanks,
    RankCallTimeout,
    RankFailure,
    RunError,
    first_lines,
    remote_cause,
)

log = logging.getLogger("luffy.trainer")

LOG_TAIL_LINES = 20
HEALTH_TIMEOUT_S = 15.0  # an engine that does not answer a health check this long after a failed sync is hung


class EngineFailure(RunError):
    def __init__(self, message: str, *, engine: int, phase: str, cause: str):
        super().__init__(message)
        self.engine, self.phase, self.cause = engine, phase, cause


# ----------------------------------------------------------------------------------------- classifying errors


def engine_fault(err: BaseException) -> Optional[str]:
    """What went wrong, when `err` (from `ray.get` on an engine call) means the engine itself failed: its actor
    died, vLLM's engine core died, or it did not answer in time. None for other errors (bad input, bugs), which
    the caller re-raises: restarting an engine would not fix them."""
    if isinstance(err, ray.exceptions.GetTimeoutError):
        return str(err) or "timed out"
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return "its Ray actor died: " + first_lines(str(err), 3)
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        if cause is not None and type(cause).__name__ == "EngineDeadError":
            return "vLLM's engine-core process died (EngineDeadError)"
        if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            return "its Ray actor died: " + first_lines(str(cause), 3)
    return None


def log_tail(path: Optional[str], lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, indented, or a sentence saying why there are none."""
    if not path:
        return "  (no log file: the fleet was not started with a log directory)"
    p = Path(path)
    try:
        with p.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as err:
        return f"  (cannot read {p} from this machine: {err.strerror}; look on the engine's node)"
    tail = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  (the log is empty)"


# ----------------------------------------------------------------------------------------- engines


class EngineSupervisor:
    """Generation and weight syncs over an `EngineFleet`, with `rollout.request_timeout_s` deadlines and
    `rollout.on_engine_failure` (fail | restart). `push` is the function every rank runs to stream its weights
    (actor/remote.py sync_weights: `push(actor, fleet, bucket_bytes)`)."""

    def __init__(
        self,
        fleet,
        ranks: GuardedRanks,
        *,
        push: Callable,
        bucket_bytes: int,
        request_timeout_s: float,
        on_engine_failure: str = "fail",
    ):
        self.fleet, self.ranks, self.push = fleet, ranks, push
        self.bucket_bytes, self.request_timeout_s, self.on_engine_failure = (
            bucket_bytes,
            request_timeout_s,
            on_engine_failure,
        )
        self.fleet.request_timeout_s = request_timeout_s
        self.restarts = 0  # engines restarted by this supervisor (rollout/engine_restarts)
        self.version = 0  # the actor's weight version the engines should hold

    # ------------------------------------------------------------------ generation

    def generate_rollouts(self, prompts, max_new_tokens, *, restart: bool = True, **sampling) -> list:
        """`EngineFleet.generate_rollouts` with the deadline and the failure policy (`restart=False`: a failed
        engine is raised as `EngineFailure` whatever rollout.on_engine_failure says)."""
        on_failure = self._on_failure() if restart else None
        return self.fleet.generate_rollouts(
            prompts, max_new_tokens, timeout_s=self.request_timeout_s, on_failure=on_failure, **sampling
        )

    def generate(self, prompts, max_new_tokens, **sampling) -> list[list[int]]:
        return self.fleet.generate(
            prompts, max_new_tokens, timeout_s=self.request_timeout_s, on_failure=self._on_failure(), **sampling
        )

    def _on_failure(self) -> Optional[Callable]:
        return self.restart_engine if self.on_engine_failure == "restart" else None

    def restart_engine(self, engine: int, failure: EngineFailure, *, sync: bool = True) -> None:
        """Starts engine `engine` again in its placement bundle, streams the actor's weights into it and labels
        them with the actor's current version, so its rows can be generated again. `sync=False`: started from
        the model's files only, for a weight sync that follows (`fleet.synced_version` is then unknown)."""
        log.warning("%s\nrollout.on_engine_failure=restart: restarting it", failure)  # with the log's last lines
        t0 = time.monotonic()
        try:
            self.fleet.restart_engine(engine)
            one = self.fleet.subset([engine])
            if sync:
                self._push_checked(one, f"re-sync of restarted engine {engine}")
                one.label_weights(self.version)
            else:
                self.fleet.synced_version = None
        except RankFailure:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the restart raised is reported in the failure
            failure.args = (
                f"{failure}\nrollout.on_engine_failure=restart: restarting it failed too: "
                f"{first_lines(f'{type(remote_cause(err)).__name__}: {remote_cause(err)}', 4)}",
            )
            raise failure from None
        self.restarts += 1
        how = f"and re-synced (weight version {self.version})" if sync else "(its weights come with the next sync)"
        log.warning("engine %d restarted %s in %.1fs", engine, how, time.monotonic() - t0)

    # ------------------------------------------------------------------ weight sync

    def push_weights(self, fleet) -> None:
        """Every rank streams its weights into `fleet` (collective), within rollout.request_timeout_s."""
        self.ranks.run(self.push, fleet, self.bucket_bytes, timeout_s=self.request_timeout_s)

    def sync(self, version: int) -> float:
        """Streams the actor's weights (weight version `version`) into every engine and labels them; returns
        the seconds taken. An engine that fails during the sync is restarted and the sync repeated once
        (restart), or reported as an `EngineFailure` (fail)."""
        t0 = time.perf_counter()
        self.version = version
        self.fleet.synced_version = None  # until every engine has the new weights
        failed = self._push_or_failed_engines(self.fleet, "weight sync")
        if failed:
            if self.on_engine_failure != "restart":
                raise failed[0]
            for failure in failed:
                self.restart_engine(failure.engine, failure)
            self._push_checked(self.fleet, "weight sync after restarting engine(s)")
        labelled = self.fleet.label_weights(version)
        for engine, ok in enumerate(labelled):
            if not ok:
                log.warning(
                    "engine %d received no weights in the sync of weight version %d: it keeps version %d, "
                    "and the rows it makes will be refused as stale",
                    engine,
                    version,
                    self.fleet.weight_versions()[engine],
                )
        if all(labelled):
            self.fleet.synced_version = version
        return time.perf_counter() - t0

    def _push_checked(self, fleet, what: str) -> None:
        failed = self._push_or_failed_engines(fleet, what)
        if failed:
            raise failed[0]

    def _push_or_failed_engines(self, fleet, what: str) -> list[EngineFailure]:
        """Runs the sync; when it fails, finds the engines that failed (dead, or not answering a health check:
        those are killed, which also frees the rank blocked on them) and returns their failures. A failure
        with every engine healthy is the ranks' own and is raised."""
        try:
            self.push_weights(fleet)
            return []
        except RankCallTimeout as err:
            failed = fleet.failed_engines(
                phase=what,
                timeout_s=HEALTH_TIMEOUT_S,
                cause=f"{what} timed out after rollout.request_timeout_s={self.request_timeout_s:g}s",
            )
            for failure in failed:
                fleet.kill_engine(failure.engine)
            if not self.ranks.drain(err.refs):
                log.warning("the Megatron ranks did not finish the failed %s within %gs", what, DRAIN_TIMEOUT_S)
            if not failed:
                raise
            return failed
        except RankFailure:
            raise
        except Exception as err:
            failed = fleet.failed_engines(
                phase=what,
                timeout_s=HEALTH_TIMEOUT_S,
                cause=first_lines(f"{type(remote_cause(err)).__name__}: {remote_cause(err)}", 2),
            )
            if not failed:
                raise
            return failed

"""Failures of the running cluster, as the trainer meets them: engines that die or hang during generation or a
weight sync, and Megatron ranks that die. Nothing waits without a bound, and every failure names what failed.

* `EngineFailure`: engine i of the fleet died (its Ray actor, or vLLM's engine-core process) or did not answer
  within `rollout.request_timeout_s`. The message names the engine, its node and pids, the phase, the cause
  and the last lines of the engine's log (`<output_dir>/logs/workers/engine_<i>.log`, where the engine actor
  and its vLLM processes write).
* `RankFailure`: a Megatron rank's actor died (or a rank call exceeded its bound); names the rank and its node.
* `EngineSupervisor`: the trainer's door to the engines. Generation and syncs with deadlines; on a failure
  either the `EngineFailure` (rollout.on_engine_failure=fail) or, with `restart`, the engine is started again
  in its placement bundle, re-synced from the actor, labelled with the actor's weight version, and its rows
  are generated again (each engine is restarted at most once per call; `restarts` counts them).
* `GuardedRanks`: `ActorGroup.call`/`run` with a polled wait, so a dead rank is reported at once (the other
  ranks may be stuck in a collective with it) and a call never waits past its bound.

The trainer (trainer.py) writes a checkpoint of the healthy actor before it reports an engine failure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("luffy.trainer")

LOG_TAIL_LINES = 20
HEALTH_TIMEOUT_S = 15.0  # an engine that does not answer a health check this long after a failed sync is hung
DRAIN_TIMEOUT_S = 120.0  # after a failed sync: how long the ranks get to finish their part before the checkpoint
RANK_CALL_TIMEOUT_S = 4 * 3600.0  # default of trainer.rank_call_timeout_s: one rank call longer than this is a hang
POLL_S = 1.0


class RunError(RuntimeError):
    """A failure of the running job that `luffy-train` reports as one `luffy-train: error: ...` line."""


class EngineFailure(RunError):
    def __init__(self, message: str, *, engine: int, phase: str, cause: str):
        super().__init__(message)
        self.engine, self.phase, self.cause = engine, phase, cause


class RankFailure(RunError):
    def __init__(self, message: str, *, rank: Optional[int], what: str):
        super().__init__(message)
        self.rank, self.what = rank, what


class RankCallTimeout(RankFailure):
    """A rank call ran past its bound; `refs` are still in flight (the caller may wait for them to drain)."""

    def __init__(self, message: str, *, what: str, refs: list):
        super().__init__(message, rank=None, what=what)
        self.refs = refs


# ----------------------------------------------------------------------------------------- classifying errors


def engine_fault(err: BaseException) -> Optional[str]:
    """What went wrong, when `err` (from `ray.get` on an engine call) means the engine itself failed: its actor
    died, vLLM's engine core died, or it did not answer in time. None for other errors (bad input, bugs), which
    the caller re-raises: restarting an engine would not fix them."""
    import ray

    if isinstance(err, ray.exceptions.GetTimeoutError):
        return str(err) or "timed out"
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return "its Ray actor died: " + _first_lines(str(err), 3)
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        if cause is not None and type(cause).__name__ == "EngineDeadError":
            return "vLLM's engine-core process died (EngineDeadError)"
        if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            return "its Ray actor died: " + _first_lines(str(cause), 3)
    return None


def remote_cause(err: BaseException) -> BaseException:
    """The exception raised inside a Ray task/actor (for a `RayTaskError`), else `err`."""
    import ray

    while isinstance(err, ray.exceptions.RayTaskError) and getattr(err, "cause", None) is not None:
        err = err.cause
    return err


def _first_lines(text: str, n: int) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:n])


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


# ----------------------------------------------------------------------------------------- Megatron ranks


class GuardedRanks:
    """The Megatron ranks of an `ActorGroup`, called like `ActorGroup.call`/`run` (result of rank 0), with
    a bounded, polled wait: the first rank whose actor died is reported at once as a `RankFailure` naming it."""

    def __init__(self, actors, *, timeout_s: float = RANK_CALL_TIMEOUT_S):
        import ray

        self.actors, self.timeout_s = actors, timeout_s
        try:
            self.infos = ray.get([w.info.remote() for w in actors.workers], timeout=120)
        except Exception:  # only for the messages
            self.infos = [{} for _ in actors.workers]

    def describe(self, rank: int) -> str:
        info = self.infos[rank] if rank < len(self.infos) else {}
        where = ", ".join(x for x in (f"node {info.get('node_ip')}" if info.get("node_ip") else "",
                                      f"host {info.get('hostname')}" if info.get("hostname") else "",
                                      f"pid {info.get('pid')}" if info.get("pid") else "") if x)
        return f"Megatron rank {rank} of {len(self.actors.workers)}" + (f" ({where})" if where else "")

    def call(self, method: str, *args, timeout_s: Optional[float] = None, **kwargs) -> Any:
        return self.wait(method, [w.call.remote(method, *args, **kwargs) for w in self.actors.workers], timeout_s)

    def run(self, fn, *args, timeout_s: Optional[float] = None, **kwargs) -> Any:
        refs = [w.run.remote(fn, *args, **kwargs) for w in self.actors.workers]
        return self.wait(getattr(fn, "__name__", "run"), refs, timeout_s)

    def wait(self, what: str, refs: list, timeout_s: Optional[float] = None) -> Any:
        """Rank 0's result once every rank answered. A rank whose actor died raises `RankFailure` at once; an
        error raised inside a rank is re-raised as Ray reports it (a `RayTaskError` naming the remote error)."""
        import ray

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        index = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(index[ref] for ref in pending)
                self.actors.broken = f"{what} timed out on rank(s) {late}"
                raise RankCallTimeout(f"{what} did not finish on Megatron rank(s) {late} within {timeout_s:g}s "
                                      f"({self.describe(late[0])})", what=what, refs=pending)
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, POLL_S))
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self.actors.broken = f"rank {rank} died during {what}"
                    raise RankFailure(f"{self.describe(rank)} died during {what}: {_first_lines(str(err), 3)}",
                                      rank=rank, what=what) from None
        return results[0]

    def drain(self, refs: list, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Waits (bounded) for calls left in flight by a `RankCallTimeout`; True when they all ended."""
        import ray

        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        return not pending


# ----------------------------------------------------------------------------------------- engines


class EngineSupervisor:
    """Generation and weight syncs over an `EngineFleet`, with `rollout.request_timeout_s` deadlines and
    `rollout.on_engine_failure` (fail | restart). `push` is the function every rank runs to stream its weights
    (trainer.sync_weights: `push(actor, fleet, bucket_bytes)`)."""

    def __init__(self, fleet, ranks: GuardedRanks, *, push: Callable, bucket_bytes: int, request_timeout_s: float,
                 on_engine_failure: str = "fail"):
        self.fleet, self.ranks, self.push = fleet, ranks, push
        self.bucket_bytes, self.request_timeout_s, self.on_engine_failure = bucket_bytes, request_timeout_s, on_engine_failure
        self.fleet.request_timeout_s = request_timeout_s
        self.restarts = 0  # engines restarted by this supervisor (rollout/engine_restarts)
        self.version = 0  # the actor's weight version the engines should hold

    # ------------------------------------------------------------------ generation

    def generate_rollouts(self, prompts, max_new_tokens, **sampling) -> list:
        """`EngineFleet.generate_rollouts` with the deadline and the failure policy."""
        return self.fleet.generate_rollouts(prompts, max_new_tokens, timeout_s=self.request_timeout_s,
                                            on_failure=self._on_failure(), **sampling)

    def generate(self, prompts, max_new_tokens, **sampling) -> list[list[int]]:
        return self.fleet.generate(prompts, max_new_tokens, timeout_s=self.request_timeout_s,
                                   on_failure=self._on_failure(), **sampling)

    def _on_failure(self) -> Optional[Callable]:
        return self.restart_engine if self.on_engine_failure == "restart" else None

    def restart_engine(self, engine: int, failure: EngineFailure) -> None:
        """Starts engine `engine` again in its placement bundle, streams the actor's weights into it and labels
        them with the actor's current version, so its rows can be generated again."""
        log.warning("%s; rollout.on_engine_failure=restart: restarting it", _first_lines(str(failure), 1))
        t0 = time.monotonic()
        try:
            self.fleet.restart_engine(engine)
            one = self.fleet.subset([engine])
            self._push_checked(one, f"re-sync of restarted engine {engine}")
            one.label_weights(self.version)
        except RankFailure:
            raise
        except Exception as err:
            failure.args = (f"{failure}\nrollout.on_engine_failure=restart: restarting it failed too: "
                            f"{_first_lines(f'{type(remote_cause(err)).__name__}: {remote_cause(err)}', 4)}",)
            raise failure from None
        self.restarts += 1
        log.warning("engine %d restarted and re-synced (weight version %d) in %.1fs", engine, self.version,
                    time.monotonic() - t0)

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
                log.warning("engine %d received no weights in the sync of weight version %d: it keeps version %d, "
                            "and the rows it makes will be refused as stale", engine, version,
                            self.fleet.weight_versions()[engine])
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
            failed = fleet.failed_engines(phase=what, timeout_s=HEALTH_TIMEOUT_S, cause=f"{what} timed out after "
                                          f"rollout.request_timeout_s={self.request_timeout_s:g}s")
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
            failed = fleet.failed_engines(phase=what, timeout_s=HEALTH_TIMEOUT_S,
                                          cause=_first_lines(f"{type(remote_cause(err)).__name__}: {remote_cause(err)}", 2))
            if not failed:
                raise
            return failed

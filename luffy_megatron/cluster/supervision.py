"""Supervision of the Megatron ranks: every call on them has a deadline, and a rank that dies is named.

* `RunError`: a failure of the running job that `luffy-train` reports as one `luffy-train: error: ...` line.
* `RankFailure`: a Megatron rank's actor died (or a rank call exceeded its bound); names the rank and its node.
* `GuardedRanks`: `ActorGroup.call`/`run` with a polled wait, so a dead rank is reported at once (the other
  ranks may be stuck in a collective with it) and a call never waits past its bound
  (`trainer.rank_call_timeout_s`).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import ray  # the ranks are Ray actors: this module is only imported where Ray runs

DRAIN_TIMEOUT_S = 120.0  # after a failed sync: how long the ranks get to finish their part before the checkpoint
RANK_CALL_TIMEOUT_S = 4 * 3600.0  # default of trainer.rank_call_timeout_s: one rank call longer than this is a hang
POLL_S = 1.0


class RunError(RuntimeError):
    """A failure of the running job that `luffy-train` reports as one `luffy-train: error: ...` line."""


class RankFailure(RunError):
    def __init__(self, message: str, *, rank: Optional[int], what: str):
        super().__init__(message)
        self.rank, self.what = rank, what


class RankCallTimeout(RankFailure):
    """A rank call ran past its bound; `refs` are still in flight (the caller may wait for them to drain)."""

    def __init__(self, message: str, *, what: str, refs: list):
        super().__init__(message, rank=None, what=what)
        self.refs = refs


def remote_cause(err: BaseException) -> BaseException:
    """The exception raised inside a Ray task/actor (for a `RayTaskError`), else `err`."""
    while isinstance(err, ray.exceptions.RayTaskError) and getattr(err, "cause", None) is not None:
        err = err.cause
    return err


def first_lines(text: str, n: int) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:n])


class GuardedRanks:
    """The Megatron ranks of an `ActorGroup`, called like `ActorGroup.call`/`run` (result of rank 0), with
    a bounded, polled wait: the first rank whose actor died is reported at once as a `RankFailure` naming it."""

    def __init__(self, actors, *, timeout_s: float = RANK_CALL_TIMEOUT_S):
        self.actors, self.timeout_s = actors, timeout_s
        try:
            self.infos = ray.get([w.info.remote() for w in actors.workers], timeout=120)
        except Exception:  # noqa: BLE001 - only for the messages
            self.infos = [{} for _ in actors.workers]

    def describe(self, rank: int) -> str:
        info = self.infos[rank] if rank < len(self.infos) else {}
        where = ", ".join(
            x
            for x in (
                f"node {info.get('node_ip')}" if info.get("node_ip") else "",
                f"host {info.get('hostname')}" if info.get("hostname") else "",
                f"pid {info.get('pid')}" if info.get("pid") else "",
            )
            if x
        )
        return f"Megatron rank {rank} of {len(self.actors.workers)}" + (f" ({where})" if where else "")

    def call(self, method: str, *args, timeout_s: Optional[float] = None, **kwargs) -> Any:
        return self.wait(method, [w.call.remote(method, *args, **kwargs) for w in self.actors.workers], timeout_s)

    def run(self, fn, *args, timeout_s: Optional[float] = None, **kwargs) -> Any:
        refs = [w.run.remote(fn, *args, **kwargs) for w in self.actors.workers]
        return self.wait(getattr(fn, "__name__", "run"), refs, timeout_s)

    def wait(self, what: str, refs: list, timeout_s: Optional[float] = None) -> Any:
        """Rank 0's result once every rank answered. A rank whose actor died raises `RankFailure` at once; an
        error raised inside a rank is re-raised as Ray reports it (a `RayTaskError` naming the remote error)."""
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
                raise RankCallTimeout(
                    f"{what} did not finish on Megatron rank(s) {late} within {timeout_s:g}s "
                    f"({self.describe(late[0])})",
                    what=what,
                    refs=pending,
                )
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, POLL_S))
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    self.actors.broken = f"rank {rank} died during {what}"
                    raise RankFailure(
                        f"{self.describe(rank)} died during {what}: {first_lines(str(err), 3)}", rank=rank, what=what
                    ) from None
        return results[0]

    def drain(self, refs: list, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Waits (bounded) for calls left in flight by a `RankCallTimeout`; True when they all ended."""
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        return not pending

"""A pool of grader processes with a hard per-item deadline.

Why not concurrent.futures.ProcessPoolExecutor or multiprocessing.Pool: neither can kill the one
worker stuck on one item; a dead worker breaks the whole executor and loses every pending result.
Here each worker has its own pipe and grades its items one at a time, in the order sent, so the parent
knows which item a worker is on and since when:

- a worker past its deadline (`timeout_s` + `grace_s`) is SIGKILLed and replaced; its item scores 0.0
  and counts as timed out;
- a worker that dies (segfault, os._exit, OOM kill, a kill from outside) is replaced and its item is graded
  once more by a new worker (a kill from outside loses nothing); an item that kills a second worker scores
  0.0 and counts as crashed;
- every other item keeps its result, and the pool stays usable.

Each worker is sent one (small) item ahead (`_ITEMS_AHEAD`), so it does not idle waiting for the parent
to be scheduled between items; on a loaded 2-core machine that round trip cost a single worker ~30% of
its throughput. An item queued behind one that is killed or crashes is sent again, not scored.

Workers are started with "forkserver" where available (else "spawn"), never plain fork: the parent may
hold torch/Ray/vLLM threads, and a forked copy of those can deadlock. An item's deadline clock starts when
its worker starts it as seen by the parent (when it is sent to an idle worker that has reported ready,
or when the answer for the item before it arrives), so neither a slow start (importing math-verify and
sympy) nor waiting in the queue is charged to an item.

`num_workers=0` grades in the calling process, for debugging: no hard deadline and no crash isolation
there, only math-verify's own alarm timeouts (which need the main thread).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from typing import Callable, Sequence

from luffy_megatron.reward.graders import GRADERS, Grader, bind_options, grader_spec, resolve_grader

logger = logging.getLogger(__name__)

_READY = "ready"
_START_TIMEOUT_S = 120.0  # a worker that has not imported its graders by then is a broken environment
_WAIT_SLICE_S = 0.5  # the parent re-checks deadlines at least this often
_ITEMS_AHEAD = 1  # items queued in a worker's pipe behind the one it is grading
# Only items this small are queued behind a busy worker: the queued message must fit in the pipe's buffer
# (64 KiB for a pipe, more for the socketpair Pipe() uses; 16 Ki chars are at most 64 KiB of UTF-8), or
# the parent would block in send() on a worker that is stuck and could no longer enforce its deadline.
_MAX_QUEUED_CHARS = 16_384


class GradingError(RuntimeError):
    """A grader raised (bad ground truth or a grader bug), as opposed to scoring a bad response 0."""


@dataclasses.dataclass
class PoolStats:
    graded: int = 0  # items whose grader returned a score
    timed_out: int = 0  # items whose worker was killed at the deadline (scored 0.0)
    crashed: int = 0  # items whose worker died while grading them, twice (scored 0.0)
    regraded: int = 0  # items sent again to a new worker after their first worker died
    worker_restarts: int = 0  # workers replaced after a timeout or a crash


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Worker loop: (index, grader, strip_special_tokens, response, gold) in,
    (index, score | None, error | None) out."""
    # Ctrl-C goes to the whole process group; the parent decides, and closes us through the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Pay the math-verify/sympy imports and lazy parser set-up (~0.5 s) before reporting ready, so
        # that no item's deadline is charged with them.
        GRADERS["math"]("\\boxed{\\frac{1}{2}}", "0.5")
        GRADERS["choice"]("ANSWER: A", "A")
        GRADERS["boxed_math"]("\\boxed{\\frac{1}{2}}", "0.25")  # luffy-eval's parse settings: not equal, so parsed
    except BaseException:  # noqa: BLE001
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send((_READY, os.getpid()))
    resolved: dict[tuple[str, bool], Callable[[str, str], float]] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if task is None:
            return
        index, spec, strip_special_tokens, response, ground_truth = task
        try:
            key = (spec, strip_special_tokens)
            if key not in resolved:
                resolved[key] = bind_options(resolve_grader(spec), strip_special_tokens=strip_special_tokens)
            conn.send((index, float(resolved[key](response, ground_truth)), None))
        except Exception as error:  # noqa: BLE001
            conn.send((index, None, f"{type(error).__name__}: {error}"))


class _Worker:
    """One process, its end of the pipe, and the items sent to it (the first is being graded)."""

    def __init__(self, context) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_conn,), daemon=True, name="luffy-reward-worker")
        self.process.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.items: collections.deque[int] = collections.deque()
        self.started_item_at = 0.0  # when the first of `items` started (as seen by the parent)
        self.deadline = float("inf")

    def start_clock(self, timeout_s: float) -> None:
        self.started_item_at = time.monotonic()
        self.deadline = self.started_item_at + timeout_s if self.items else float("inf")

    def stop(self, kill: bool) -> None:
        if self.process.is_alive() and not kill and not self.items:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: the only thing a stuck C-level sympy computation obeys
        self.process.join()
        self.conn.close()
        self.process.close()


class RewardPool:
    """Grade (response, ground truth) pairs in worker processes; see the module docstring.

    >>> with RewardPool(num_workers=2, timeout_s=10.0, grader="luffy_think") as pool:
    ...     rewards = pool.grade([(response, gold), ...])

    `strip_special_tokens` (`RewardConfig.strip_special_tokens`) is passed to every grader this pool runs:
    False (the default) grades the decoded text with its trailing special tokens, as upstream LUFFY does;
    True strips them first (see `reward.graders`).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        grader: str | Grader = "luffy_think",
        grace_s: float = 0.5,
        start_method: str | None = None,
        strip_special_tokens: bool = False,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.strip_special_tokens = bool(strip_special_tokens)
        self.grader = self._checked_spec(grader)
        self.stats = PoolStats()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Workers, and above all their replacements after a kill, then fork from a server that has
            # math-verify and sympy imported already (~1 s less per restart, more on a loaded machine).
            # It takes effect only if this process's forkserver has not started yet, and keeps the
            # default preload of __main__.
            self._context.set_forkserver_preload(["__main__", "luffy_megatron.reward.graders"])
        self._workers = [_Worker(self._context) for _ in range(num_workers)]

    # -- public -------------------------------------------------------------------------------------

    def grade(
        self,
        items: Sequence[tuple[str, str]],
        grader: str | Grader | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[float]:
        """Scores for (response, ground_truth) pairs, in input order (one call at a time, not thread-safe).

        `progress(num_done, num_total)` is called as items finish (at most ~10 times a second).
        Raises GradingError after the whole batch if a grader raised on some item.
        """
        spec = self.grader if grader is None else self._checked_spec(grader)
        if self.num_workers == 0:
            return self._grade_in_process(items, spec, progress)
        if self._workers is None:
            raise RuntimeError("RewardPool is closed")
        scores: list[float | None] = [None] * len(items)
        errors: dict[int, str] = {}
        pending = collections.deque(range(len(items)))
        self._died_on: set[int] = set()  # items whose first worker died on them
        num_done, last_report = 0, 0.0
        try:
            while num_done < len(items):
                self._dispatch(pending, items, spec)
                num_done += self._collect(scores, errors, pending)
                if progress is not None and (time.monotonic() - last_report > 0.1 or num_done == len(items)):
                    progress(num_done, len(items))
                    last_report = time.monotonic()
        except BaseException:  # Ctrl-C, a failed start: no stale answer may leak into the next call
            for worker in self._workers:
                if worker.items:
                    self._replace(worker)
            raise
        self._raise_if_errors(errors, spec)
        return scores  # type: ignore[return-value]

    def close(self) -> None:
        """Stop exactly the processes this pool started (politely if idle, SIGKILL otherwise)."""
        if self._workers is None:
            return
        for worker in self._workers:
            worker.stop(kill=False)
        self._workers = None

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers or []]

    # -- internals ----------------------------------------------------------------------------------

    def _checked_spec(self, grader: str | Grader) -> str:
        """The grader's picklable name, refused here (not in a worker) if it cannot take this pool's options."""
        spec = grader_spec(grader)
        bind_options(resolve_grader(spec), strip_special_tokens=self.strip_special_tokens)
        return spec

    def _grade_in_process(self, items, spec, progress) -> list[float]:
        grade_one = bind_options(resolve_grader(spec), strip_special_tokens=self.strip_special_tokens)
        scores, errors = [], {}
        for index, (response, ground_truth) in enumerate(items):
            try:
                scores.append(float(grade_one(response, ground_truth)))
                self.stats.graded += 1
            except Exception as error:  # noqa: BLE001
                scores.append(0.0)
                errors[index] = f"{type(error).__name__}: {error}"
            if progress is not None:
                progress(index + 1, len(items))
        self._raise_if_errors(errors, spec)
        return scores

    def _dispatch(self, pending: collections.deque, items, spec: str) -> None:
        """Top up every ready worker with pending items, up to 1 + _ITEMS_AHEAD in flight."""
        for worker in self._workers:
            while pending and worker.ready and len(worker.items) <= _ITEMS_AHEAD:
                response, ground_truth = items[pending[0]]
                if worker.items and len(response) + len(ground_truth) > _MAX_QUEUED_CHARS:
                    break  # sent when this worker is idle instead
                index = pending.popleft()
                try:
                    worker.conn.send((index, spec, self.strip_special_tokens, response, ground_truth))
                except OSError:  # it died; _collect sees that and accounts for its items
                    pending.appendleft(index)
                    break
                worker.items.append(index)
                if len(worker.items) == 1:
                    worker.start_clock(self.timeout_s + self.grace_s)

    def _collect(self, scores: list, errors: dict, pending: collections.deque) -> int:
        """Wait for results or the nearest deadline; returns how many items finished."""
        now = time.monotonic()
        wait_s = min([w.deadline - now for w in self._workers] + [_WAIT_SLICE_S])
        ready = multiprocessing.connection.wait(
            [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers], timeout=max(wait_s, 0.0)
        )
        num_done = 0
        for worker in list(self._workers):
            if worker.conn in ready:  # a result, or EOF if it died (a last result is read before the EOF)
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # died: its pipe end closed with it
                    num_done += self._fail(worker, scores, pending, reason="crashed")
                    continue
                if message[0] == _READY:
                    worker.ready = True
                elif message[0] == "init_error":
                    raise RuntimeError(f"a reward worker failed to start:\n{message[1]}")
                else:
                    index, score, error = message
                    assert index == worker.items[0], (index, worker.items)
                    worker.items.popleft()
                    worker.start_clock(self.timeout_s + self.grace_s)  # the next one starts now
                    if error is None:
                        scores[index] = score
                        self.stats.graded += 1
                    else:
                        scores[index] = 0.0
                        errors[index] = error
                    num_done += 1
            elif worker.process.sentinel in ready:  # died, and its pipe had nothing left to read
                num_done += self._fail(worker, scores, pending, reason="crashed")
            elif time.monotonic() > worker.deadline:
                num_done += self._fail(worker, scores, pending, reason="timed_out")
            elif not worker.ready and time.monotonic() - worker.started_at > _START_TIMEOUT_S:
                raise RuntimeError(f"a reward worker did not start within {_START_TIMEOUT_S:.0f} s")
        return num_done

    def _fail(self, worker: _Worker, scores: list, pending: collections.deque, reason: str) -> int:
        """Replace the worker and send the items queued behind it again; the item it was on is sent again too
        after its first crash, else scored 0.0.

        Returns how many items finished (0 or 1)."""
        index = worker.items.popleft() if worker.items else None
        pending.extendleft(reversed(worker.items))
        worker.items.clear()
        worker.process.join(timeout=0.1 if reason == "crashed" else 0.0)  # so that exitcode is known
        if index is not None and reason == "crashed" and index not in self._died_on:
            self._died_on.add(index)
            pending.appendleft(index)
            self.stats.regraded += 1
            logger.warning(
                "a reward worker died on item %d (exit code %s); replaced, and the item is graded again",
                index,
                worker.process.exitcode,
            )
            self._replace(worker)
            return 0
        if index is not None:
            scores[index] = 0.0
            setattr(self.stats, reason, getattr(self.stats, reason) + 1)
            cause = "timed out" if reason == "timed_out" else f"crashed (exit code {worker.process.exitcode})"
            logger.warning(
                "reward item %d %s after %.1f s; scored 0.0, worker replaced",
                index,
                cause,
                time.monotonic() - worker.started_item_at,
            )
        elif worker.ready or (worker.process.exitcode or 0) < 0:
            # Idle, or killed by a signal before it reported ready (e.g. an external kill while it was
            # still importing sympy on a loaded machine): not the import failure diagnosed below.
            logger.warning(
                "a reward worker died %s (exit code %s); replaced",
                "while idle" if worker.ready else "during start-up",
                worker.process.exitcode,
            )
        else:
            raise RuntimeError(
                f"a reward worker died during start-up (exit code {worker.process.exitcode}); "
                "if a script creates the RewardPool at import time, guard that code with "
                "`if __name__ == '__main__':` (workers import the main module)"
            )
        self._replace(worker)
        return 0 if index is None else 1

    def _replace(self, worker: _Worker) -> None:
        worker.items.clear()
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = _Worker(self._context)
        self.stats.worker_restarts += 1

    def _raise_if_errors(self, errors: dict[int, str], spec: str) -> None:
        if errors:
            shown = "; ".join(f"item {index}: {message}" for index, message in list(errors.items())[:5])
            raise GradingError(f"grader {spec!r} raised on {len(errors)} of the items ({shown})")

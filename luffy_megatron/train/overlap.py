"""Where each step's batch comes from: generated when the step starts (trainer.overlap=none), or, under
trainer.overlap=one_step, generated while the previous step trained.

one_step, step by step (v_k: the actor's weights after update k; the engines hold v_(k-1) while update k runs):

    step k:  take batch k (its generation by v_(k-2) ran during step k-1) -> start generating batch k+1 with
             v_(k-1) -> reward, log-probs, update k -> `settle`: wait for batch k+1 -> sync v_k -> step k+1

so every generated row of batch k+1 carries weight version k-1 while the actor is at k: one update behind
(`rollout/weight_version_lag` 1, accepted by the staleness guard; two behind is refused). The first step of a
run, and of a resumed run, is generated when it starts (on-policy). The demonstrations, the group mixing, the
advantages and the loss are those of the synchronous loop; only the on-policy rows' sampling weights differ,
which `algo.rollout_is` corrects.

The batch generated ahead is not trained until its step: a stop (preemption) drops it, and the checkpoint's
data position is that of the last trained batch (`position_after`), so a resumed run draws and generates those
prompts again. An engine that fails while generating ahead is not restarted in the middle of an update (its
re-sync would race the update on the ranks): `settle` restarts it without weights (rollout.on_engine_failure=
restart; the sync that follows gives it the new ones) and the batch is generated again when its step starts,
with the current weights; with on_engine_failure=fail the failure is raised there.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from luffy_megatron.rollout.faults import EngineFailure
from luffy_megatron.train.step_parts import StepDeps, generate_and_mix, step_rng

log = logging.getLogger("luffy.trainer")


@dataclass
class Ahead:
    """A batch whose generation started before its step."""

    step: int
    prompts: list
    future: concurrent.futures.Future
    started: float = field(default_factory=time.time)
    ended: Optional[float] = None


class Rollouts:
    """The batches of a run, in step order (`take`), drawn from `sampler` over `train_set`."""

    def __init__(self, deps: StepDeps, train_set: list, sampler, last_step: int):
        self.deps, self.train_set, self.sampler, self.last_step = deps, train_set, sampler, last_step
        self.one_step = deps.cfg.trainer.overlap == "one_step"
        self.positions: dict[int, int] = {}  # step -> the sampler's position after that step's prompts
        self.ahead: Optional[Ahead] = None
        self.regenerate: Optional[list] = None  # prompts whose batch generated ahead was lost with its engine
        self.intervals: dict[str, tuple[float, float]] = {}  # what ran when during the step (perf/overlap_s)
        self._trainer_from = time.time()
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="luffy-ahead") if self.one_step else None
        )

    def take(self, step: int) -> tuple[list, tuple]:
        """The prompts of `step` and its generated, mixed batch (`generate_and_mix`'s result); under one_step
        the generation of step+1 starts before this returns."""
        self.intervals = {}
        if self.ahead is not None and self.ahead.step == step:
            prompts, result = self.ahead.prompts, self.ahead.future.result()
            self.ahead = None
        else:
            prompts = self.regenerate if self.regenerate is not None else self._draw(step)
            self.regenerate = None
            result = generate_and_mix(*self._generation_args(prompts, step), restart=True)
        if self.one_step and step < self.last_step:
            self._start_ahead(step + 1)
        self._trainer_from = time.time()  # the trainer's part of the step starts (`overlap_seconds`)
        return prompts, result

    def position_after(self, step: int) -> int:
        """The data position a checkpoint after `step` records (not counting a batch generated ahead)."""
        return self.positions.get(step, self.sampler.position)

    def settle(self) -> None:
        """Before the weight sync: the generation started ahead has ended (the engines take no weights while
        generating). An engine that failed meanwhile is restarted without weights (restart mode; the sync gives
        it the new ones) and the batch is generated again when its step starts; in fail mode the failure is
        raised. Records when the generation ran (`overlap_seconds`)."""
        self.intervals["train"] = (self._trainer_from, time.time())
        ahead = self.ahead
        if ahead is None:
            return
        try:
            ahead.future.result()
        except EngineFailure as failure:
            self.ahead = None
            if self.deps.cfg.rollout.on_engine_failure != "restart":
                raise
            self.deps.engines.restart_engine(failure.engine, failure, sync=False)
            self.regenerate = ahead.prompts
            log.warning("the batch of step %d is generated again when its step starts", ahead.step)
        finally:
            ahead.ended = ahead.ended or time.time()
            self.intervals["generate_next"] = (ahead.started, ahead.ended)

    def drop(self) -> None:
        """A stop: the batch generated ahead is waited for (the engines must be idle) and dropped."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            concurrent.futures.wait([ahead.future])
            log.warning("the batch generated ahead for step %d is dropped (generated again after a resume)", ahead.step)

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def overlap_seconds(self) -> float:
        """How long the next batch's generation and the trainer's part of this step (grading, log-probs,
        update: from `take` to `settle`) ran at the same time."""
        if "generate_next" not in self.intervals or "train" not in self.intervals:
            return 0.0
        (a0, a1), (b0, b1) = self.intervals["generate_next"], self.intervals["train"]
        return max(0.0, min(a1, b1) - max(a0, b0))

    def _draw(self, step: int) -> list:
        prompts = [self.train_set[i] for i in self.sampler.next_batch()]
        self.positions[step] = self.sampler.position
        return prompts

    def _generation_args(self, prompts: list, step: int) -> tuple[Any, ...]:
        cfg = self.deps.cfg
        return cfg, self.deps.engines, self.deps.tokenizer, prompts, step, step_rng(cfg, step)

    def _start_ahead(self, step: int) -> None:
        prompts = self._draw(step)
        ahead = Ahead(step, prompts, concurrent.futures.Future())

        def run() -> tuple:
            try:  # no restart from this thread: the ranks are busy with the update (`settle` restarts)
                return generate_and_mix(*self._generation_args(prompts, step), restart=False)
            finally:
                ahead.ended = time.time()

        ahead.future = self._pool.submit(run)
        self.ahead = ahead

"""trainer.overlap=one_step without engines: where it is refused, what the staleness guard accepts, and the
order of `train.overlap.Rollouts` (which batch is generated when, the data position a checkpoint records, what a
stop or an engine failure does to the batch generated ahead). The real loop on real engines:
tests/e2e/test_fault_matrix.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.cluster import layout
from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.rollout.faults import EngineFailure
from luffy_megatron.rollout.integrity import RolloutRecord, StaleRolloutError, check_weight_versions
from luffy_megatron.train import overlap


def test_one_step_is_refused_where_the_engines_share_the_trainers_gpus():
    with pytest.raises(ConfigError, match="cluster.layout=colocated puts the engines on the trainer's GPUs"):
        load_config(None, ["trainer.overlap=one_step", "cluster.layout=colocated"])
    cfg = load_config(None, ["trainer.overlap=one_step"])  # auto: decided when the cluster's GPUs are known
    with pytest.raises(ConfigError, match=r"cluster.layout=auto \(cluster.layout=auto is colocated on GPUs\)"):
        layout.resolve_mode(cfg, cluster_has_gpus=True)
    assert layout.resolve_mode(cfg, cluster_has_gpus=False) == "cpu"
    assert layout.resolve_mode(load_config(None, []), cluster_has_gpus=True) == "colocated"
    with pytest.raises(ConfigError, match="algo.mode=sft generates nothing"):
        load_config(None, ["trainer.overlap=one_step", "algo.mode=sft", "rollout.n_off_policy=-1"])


def record(*versions) -> RolloutRecord:
    rows = len(versions)
    return RolloutRecord(
        [0] * rows, [tuple(v) for v in versions], torch.zeros(rows, 4), torch.ones(rows, 4, dtype=bool)
    )


def test_the_guard_takes_rows_one_update_old_under_one_step_and_refuses_two():
    check_weight_versions(record((2,), (1,)), 2, max_lag=1)
    with pytest.raises(StaleRolloutError):
        check_weight_versions(record((2,), (1,)), 2)  # trainer.overlap=none: only the actor's own version
    with pytest.raises(StaleRolloutError) as refused:
        check_weight_versions(record((2,), (0,)), 2, max_lag=1)
    assert (refused.value.engine_version, refused.value.actor_version) == (0, 2)
    with pytest.raises(StaleRolloutError):
        check_weight_versions(record((3,)), 2, max_lag=1)  # newer than the actor: never


class Engines:
    """Stands in for generate_and_mix: records which step generated when, on which thread, with what."""

    def __init__(self, seconds=0.05, fail_at=None):
        self.calls, self.seconds, self.fail_at = [], seconds, fail_at
        self.restarted: list = []

    def generate_and_mix(self, cfg, engines, tokenizer, prompts, step, rng, restart=True):
        self.calls.append((step, [p for p in prompts], threading.current_thread().name, restart))
        time.sleep(self.seconds)
        if self.fail_at == (step, len(self.calls)):
            raise EngineFailure("engine 0 died", engine=0, phase="generation", cause="killed")
        return ("batch", step, tuple(prompts))

    def restart_engine(self, engine, failure, sync=True):
        self.restarted.append((engine, sync))


def rollouts(monkeypatch, mode: str, fake: Engines, last_step=3, on_failure="restart") -> overlap.Rollouts:
    monkeypatch.setattr(overlap, "generate_and_mix", fake.generate_and_mix)
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(overlap=mode, seed=1), rollout=SimpleNamespace(on_engine_failure=on_failure)
    )
    deps = SimpleNamespace(cfg=cfg, engines=fake, tokenizer=None)
    return overlap.Rollouts(deps, list(range(100)), PromptSampler(100, 2, seed=0, shuffle=False), last_step)


def test_none_generates_each_batch_when_its_step_starts(monkeypatch):
    fake = Engines()
    source = rollouts(monkeypatch, "none", fake)
    for step in (1, 2):
        prompts, result = source.take(step)
        assert result == ("batch", step, tuple(prompts)) and source.ahead is None
        source.settle()
        assert source.position_after(step) == 2 * step
    assert [c[0] for c in fake.calls] == [1, 2] and all(c[2] == "MainThread" for c in fake.calls)


def test_one_step_generates_the_next_batch_beside_the_step_and_records_the_trained_position(monkeypatch):
    fake = Engines()
    source = rollouts(monkeypatch, "one_step", fake)
    prompts1, _ = source.take(1)
    time.sleep(0.1)  # the trainer's part of step 1 (grading, log-probs, update) while batch 2 is generated
    source.settle()
    assert source.overlap_seconds() > 0.03
    assert source.position_after(1) == 2 and source.sampler.position == 4  # batch 2's prompts drawn already
    prompts2, result2 = source.take(2)
    assert result2 == ("batch", 2, tuple(prompts2)) and prompts2 != prompts1
    source.settle()
    source.take(3)  # the last step: nothing generated after it
    assert source.ahead is None
    steps = [(c[0], c[2].startswith("luffy-ahead"), c[3]) for c in fake.calls]
    assert steps == [(1, False, True), (2, True, False), (3, True, False)]  # ahead: no restart from the thread
    source.close()


def test_a_stop_drops_the_batch_generated_ahead_and_the_position_excludes_it(monkeypatch):
    fake = Engines(seconds=0.2)
    source = rollouts(monkeypatch, "one_step", fake)
    source.take(1)
    source.drop()  # waits for it
    assert source.ahead is None and source.position_after(1) == 2 and len(fake.calls) == 2
    source.close()


def test_an_engine_lost_while_generating_ahead_is_restarted_without_weights_and_the_batch_made_again(monkeypatch):
    fake = Engines(fail_at=(2, 2))
    source = rollouts(monkeypatch, "one_step", fake)
    source.take(1)
    source.settle()  # the failure surfaces before the sync, not during the update
    assert fake.restarted == [(0, False)]  # the sync that follows gives the new engine its weights
    prompts2, result2 = source.take(2)
    assert result2 == ("batch", 2, tuple(prompts2)) and fake.calls[2][:2] == (2, fake.calls[1][1])  # same prompts
    assert fake.calls[2][2] == "MainThread"  # generated when its step starts, with the synced weights
    source.close()

    failing = rollouts(monkeypatch, "one_step", Engines(fail_at=(2, 2)), on_failure="fail")
    failing.take(1)
    with pytest.raises(EngineFailure):
        failing.settle()
    failing.close()


def test_under_one_step_on_cpu_the_ranks_keep_off_the_engines_cores():
    from luffy_megatron.cluster.cpu_cores import engine_cores, rank_cores, ranks_keep_off_engines

    assert rank_cores(1, [0, 1], free=False) == [0, 1]  # taking turns: every core
    assert engine_cores(0, 1, [0, 1]) == [0] and rank_cores(1, [0, 1], free=True) == [1]
    assert rank_cores(2, list(range(8)), free=True) == [6, 7]  # engines on 0-2 and 3-5
    assert rank_cores(2, [0, 1], free=True) == [0, 1]  # the engines bind every core: nothing to keep off
    assert ranks_keep_off_engines("auto", "one_step") and not ranks_keep_off_engines("auto", "none")
    assert ranks_keep_off_engines("free", "none") and not ranks_keep_off_engines("all", "one_step")

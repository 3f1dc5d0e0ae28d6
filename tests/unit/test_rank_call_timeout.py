"""trainer.rank_call_timeout_s: every bounded call on the Megatron ranks uses it (GuardedRanks, built by
`train.setup.supervise`), including the optimizer offload/reload that a step makes through `cluster.workers.Workers`;
a non-positive value is refused by the config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from luffy_megatron.cluster.workers import Workers
from luffy_megatron.config import ConfigError, load_config


class Method:
    def __init__(self, rank: int, name: str):
        self.rank, self.name = rank, name

    def remote(self):
        return (self.name, self.rank)  # stands for the object ref of the call


class RankStandIn:
    def __init__(self, rank: int):
        self.offload_to_host = Method(rank, "offload_to_host")
        self.reload_to_device = Method(rank, "reload_to_device")

    info = None  # GuardedRanks asks for infos (for its messages) and copes without


class RecordingRanks:
    def __init__(self):
        self.calls = []

    def wait(self, what, refs, timeout_s=None):
        self.calls.append((what, refs))
        return {"moved_bytes": 1}


def placement(mode: str):
    return SimpleNamespace(mode=mode)


def test_guard_builds_the_rank_guard_with_the_configured_timeout_and_hands_it_to_the_workers():
    from luffy_megatron.train.setup import supervise

    cfg = load_config(None, ["trainer.rank_call_timeout_s=90"])
    actors = SimpleNamespace(workers=[])
    workers = Workers(placement("cpu"), actors, SimpleNamespace(), offload=True)
    ranks, engines = supervise(cfg, workers)
    assert ranks.timeout_s == 90.0 and actors.call_timeout_s == 90.0
    assert workers.ranks is ranks and engines.ranks is ranks


def test_offload_and_reload_go_through_the_bounded_rank_calls():
    actors = SimpleNamespace(
        workers=[RankStandIn(0), RankStandIn(1)],
        offload_to_host=lambda: pytest.fail("unbounded offload call"),
        reload_to_device=lambda: pytest.fail("unbounded reload call"),
    )
    ranks = RecordingRanks()
    workers = Workers(placement("cpu"), actors, None, offload=True, ranks=ranks)
    assert set(workers.training_phase()) == set()  # nothing is on host before the first offload
    assert set(workers.rollout_phase()) == {"perf/optimizer_offload_s"}
    assert set(workers.training_phase()) == {"perf/optimizer_reload_s"}
    assert ranks.calls == [
        ("offload_to_host", [("offload_to_host", 0), ("offload_to_host", 1)]),
        ("reload_to_device", [("reload_to_device", 0), ("reload_to_device", 1)]),
    ]


def test_without_a_guard_the_workers_call_the_actor_group():
    done = []
    actors = SimpleNamespace(
        workers=[], offload_to_host=lambda: done.append("offload"), reload_to_device=lambda: done.append("reload")
    )
    workers = Workers(placement("cpu"), actors, None, offload=True)
    workers.rollout_phase()
    workers.training_phase()
    assert done == ["offload", "reload"]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_non_positive_timeout_is_refused(value):
    with pytest.raises(ConfigError, match=r"trainer.rank_call_timeout_s=.* must be > 0"):
        load_config(None, [f"trainer.rank_call_timeout_s={value}"])

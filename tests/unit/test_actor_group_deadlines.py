"""Every wait of the driver on the Megatron ranks through `cluster.ActorGroup` has a deadline (issue 24, item 4):
the model build and the plain calls are bounded by trainer.rank_call_timeout_s, and an expiry names the call,
the ranks that did not answer and the setting, as one `luffy-train: error:` line, and marks the group broken."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from luffy_megatron.cluster import actor_group
from luffy_megatron.cluster.actor_group import ActorGroup
from luffy_megatron.cluster.supervision import RankCallTimeout, RunError


class Method:
    def __init__(self, rank: int):
        self.rank = rank

    def remote(self, *args, **kwargs):
        return f"ref{self.rank}"


class Rank:
    def __getattr__(self, name):
        return Method(self.rank)

    def __init__(self, rank: int):
        self.rank = rank


@pytest.fixture
def group(monkeypatch):
    """Two ranks; rank 1 never answers. `waited` records the timeout each ray.get was given."""
    waited = []

    def get(refs, timeout=None):
        waited.append(timeout)
        raise ray.exceptions.GetTimeoutError("timed out")

    monkeypatch.setattr(actor_group.ray, "get", get)
    monkeypatch.setattr(actor_group.ray, "wait", lambda refs, num_returns, timeout: (["ref0"], ["ref1"]))
    g = ActorGroup.__new__(ActorGroup)
    g.workers = [Rank(0), Rank(1)]
    return g, waited


def test_a_model_build_that_does_not_finish_is_named_with_its_setting(group):
    g, waited = group
    cfg = SimpleNamespace(trainer=SimpleNamespace(rank_call_timeout_s=90.0))
    with pytest.raises(RankCallTimeout) as err:
        g.build(cfg, "hf", 0)
    assert waited == [90.0]
    assert str(err.value) == (
        "the model build on the Megatron ranks did not finish within 90s (trainer.rank_call_timeout_s): "
        "no answer from rank(s) [1]"
    )
    assert isinstance(err.value, RunError)  # luffy-train reports it as one line
    assert g.broken == "the model build timed out on rank(s) [1]"  # shutdown skips the exit barrier


@pytest.mark.parametrize(
    "call, what",
    [
        (lambda g: g.call("compute_log_probs", None), "compute_log_probs"),
        (lambda g: g.run(len), "len"),
        (lambda g: g.offload_to_host(), "offload_to_host"),
        (lambda g: g.reload_to_device(), "reload_to_device"),
        (lambda g: g.release_cache(), "release_cache"),
        (lambda g: g.infos(), "info"),
        (lambda g: g.events(), "get_events"),
        (lambda g: g.memory_ledgers(), "memory_ledger"),
    ],
)
def test_every_call_on_the_ranks_is_bounded(group, call, what):
    g, waited = group
    g.call_timeout_s = 30.0
    with pytest.raises(RankCallTimeout, match=rf"^{what} on the Megatron ranks did not finish within 30s"):
        call(g)
    assert waited == [30.0]

"""`train.setup.start_workers`: when the engines start against the Megatron ranks' build. Colocated GPUs: after
the build and the give-back (vLLM needs the memory free); every other layout: before the build, so the two
starts overlap; a build that fails there kills the engines already starting."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from luffy_megatron.config import load_config
from luffy_megatron.train import setup

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _start(monkeypatch, mode: str, order: list[str], *, build_fails: bool = False) -> list[str]:
    placement = SimpleNamespace(
        layout=SimpleNamespace(uses_gpus=mode != "cpu", mode=mode),
        mode=mode,
        describe=lambda: mode,
        release=lambda: order.append("release"),
    )
    starting = SimpleNamespace(
        wait=lambda: order.append("engines up") or SimpleNamespace(close=lambda: order.append("engines closed")),
        cancel=lambda: order.append("engines killed"),
    )
    ranks = SimpleNamespace(
        offload_to_host=lambda: order.append("offload"), shutdown=lambda: order.append("ranks shut down")
    )

    def build(*args, **kwargs):
        order.append("build")
        if build_fails:
            raise RuntimeError("the model does not load")

    monkeypatch.setattr(setup, "reserve", lambda cfg: placement)
    monkeypatch.setattr(setup, "refuse_unsafe_colocation", lambda cfg, layout: None)
    monkeypatch.setattr(setup, "ActorGroup", lambda p: ranks)
    monkeypatch.setattr(setup, "build_ranks", build)
    monkeypatch.setattr(setup, "launch_engines", lambda *a, **kw: order.append("engines launched") or starting)
    setup.start_workers(load_config(RECIPES / "cpu_demo.yaml"), 0, use_gpu=mode != "cpu")
    return order


def test_colocated_engines_start_after_the_build_and_the_give_back(monkeypatch):
    assert _start(monkeypatch, "colocated", []) == ["build", "offload", "engines launched", "engines up"]


@pytest.mark.parametrize("mode", ["cpu", "disaggregated"])
def test_engines_of_their_own_start_before_the_build(monkeypatch, mode):
    assert _start(monkeypatch, mode, []) == ["engines launched", "build", "engines up"]


def test_a_failed_build_kills_the_engines_already_starting(monkeypatch):
    order: list[str] = []
    with pytest.raises(RuntimeError, match="the model does not load"):
        _start(monkeypatch, "disaggregated", order, build_fails=True)
    assert order == ["engines launched", "build", "engines killed", "ranks shut down", "release"]


def test_engines_up_by_the_wait_count_even_when_the_build_outlasted_their_deadline(monkeypatch):
    """The engines' start deadline runs from their launch; ranks that build for longer than it must not fail
    engines that are up by then. Engines still starting past it are a TimeoutError."""
    import time

    from luffy_megatron.rollout import ray_engine

    ready: set[str] = set()
    fake_ray = SimpleNamespace(
        wait=lambda refs, num_returns, timeout: ([r for r in refs if r in ready], [r for r in refs if r not in ready]),
        get=lambda refs: [{"ref": r} for r in refs],
    )
    monkeypatch.setattr(ray_engine, "ray", fake_ray)
    engines = [SimpleNamespace(info=SimpleNamespace(remote=lambda i=i: f"engine{i}")) for i in range(2)]
    launched = time.monotonic() - 100.0  # the ranks built for 100 s; the deadline is 10 s
    ready.update({"engine0", "engine1"})
    assert ray_engine._wait_started(engines, 10.0, since=launched) == [{"ref": "engine0"}, {"ref": "engine1"}]
    ready.discard("engine1")
    with pytest.raises(TimeoutError, match="1 of 2 vLLM engines did not start within 10s"):
        ray_engine._wait_started(engines, 10.0, since=launched)

"""What depends on an engine's device is decided by the engine, from vLLM's platform, not by the driver:
CUDA graphs (`rollout.enforce_eager`, None = graphs on GPUs, eager on vLLM-CPU) and the OpenMP thread count
(all cores for a vLLM-CPU engine, Ray's setting left alone on a GPU engine)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from luffy_megatron.config import load_config
from luffy_megatron.rollout import ray_engine
from luffy_megatron.rollout.ray_engine import cpu_engine_threads, resolve_enforce_eager
from luffy_megatron.train import setup

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
GPU_RECIPES = ["luffy_main.yaml", "luffy_14b_16node.yaml", "luffy_32b_16node.yaml"]
CPU_RECIPES = ["cpu_demo.yaml", "experiment_cpu.yaml", "slurm_cpu_test.yaml"]


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_decode_with_cuda_graphs(recipe):
    """N5: eager mode builds no CUDA graphs, so decoding pays a kernel launch per op."""
    cfg = load_config(RECIPES / recipe)
    assert cfg.rollout.enforce_eager is False
    assert resolve_enforce_eager(cfg.rollout.enforce_eager, on_cpu=False) is False


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_cpu_recipes_leave_eager_mode_to_the_engine_device(recipe):
    cfg = load_config(RECIPES / recipe)
    assert cfg.rollout.enforce_eager is None
    assert resolve_enforce_eager(cfg.rollout.enforce_eager, on_cpu=True) is True  # vLLM-CPU: no torch.compile
    assert resolve_enforce_eager(cfg.rollout.enforce_eager, on_cpu=False) is False  # the same recipe on a GPU


def test_explicit_enforce_eager_is_kept_on_either_device():
    for on_cpu in (True, False):
        assert resolve_enforce_eager(True, on_cpu) is True and resolve_enforce_eager(False, on_cpu) is False


def test_only_cpu_engines_get_every_core_as_openmp_threads():
    """N8: a GPU engine keeps the one thread Ray gives it; a vLLM-CPU engine takes the node's cores; an explicit
    OMP_NUM_THREADS in the engine's env wins on both."""
    assert cpu_engine_threads(True, None, 16) == "16"
    assert cpu_engine_threads(True, {"VLLM_CPU_KVCACHE_SPACE": "1"}, 16) == "16"
    assert cpu_engine_threads(True, None, None) == "1"
    assert cpu_engine_threads(False, None, 224) is None
    assert cpu_engine_threads(True, {"OMP_NUM_THREADS": "2"}, 16) is None
    assert cpu_engine_threads(False, {"OMP_NUM_THREADS": "2"}, 16) is None


def _placement(mode: str):
    gpus = mode != "cpu"
    layout = SimpleNamespace(engines=[object()], mode=mode, uses_gpus=gpus)
    return SimpleNamespace(layout=layout, engine_launch=lambda e: {"options": {"num_cpus": 0, "num_gpus": 0}})


@pytest.mark.parametrize("mode", ["colocated", "cpu"])
def test_the_driver_sets_no_engine_threads_and_passes_eager_mode_through(monkeypatch, mode):
    """The driver's cores and CUDA say nothing about the engines' nodes: it leaves both decisions to them."""
    started = {}
    monkeypatch.setattr(setup.EngineFleet, "launch", lambda *args, **kw: started.update(kw) or "fleet")
    for recipe, eager in (("luffy_main.yaml", False), ("cpu_demo.yaml", None)):
        cfg = load_config(RECIPES / recipe)
        assert setup.launch_engines(cfg, _placement(mode), use_gpu=mode != "cpu") == "fleet"
        assert "OMP_NUM_THREADS" not in (started.get("env") or {})
        assert started["enforce_eager"] is eager


@pytest.mark.parametrize("on_cpu", [True, False])
def test_engine_actor_decides_threads_and_graphs_from_vllm_platform(monkeypatch, on_cpu):
    """The actor itself (Ray's wrapper aside) with vLLM stubbed: what it hands vLLM and its processes."""
    from vllm.platforms import current_platform  # lazy: vLLM only where this test runs

    got = {}

    class FakeEngine:
        def __init__(self, model_dir, **kwargs):
            got.update(kwargs, omp=ray_engine.os.environ.get("OMP_NUM_THREADS"))

        def core_pids(self):
            return []

        def device_holdings(self):
            return {"engine_weights", "engine_kv"}

    monkeypatch.setattr(current_platform, "is_cpu", lambda: on_cpu)
    monkeypatch.setattr(ray_engine, "VLLMEngine", FakeEngine)
    monkeypatch.setattr(ray_engine, "placement_info", lambda: {})
    monkeypatch.setattr(ray_engine.os, "cpu_count", lambda: 12)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it for an actor without CPUs
    actor_cls = ray_engine.VLLMEngineActor.__ray_actor_class__
    actor_cls("model", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, enforce_eager=None, tensor_parallel_size=1)
    assert got["enforce_eager"] is on_cpu
    assert got["omp"] == ("12" if on_cpu else "1")

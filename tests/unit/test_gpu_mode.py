"""N9: whether the job runs on GPUs is the Ray cluster's layout, not the driver's `torch.cuda.is_available()`: a
driver on a login node or in a job step without GPUs still drives a GPU cluster's job, and leaves the
GPU-only Megatron settings to the ranks, which see the GPUs."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.actor import megatron_actor
from luffy_megatron.actor.megatron_actor import Kernels
from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.train import setup
from luffy_megatron.train.setup import driver_judges_kernels, gpu_mode

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CPU_KERNELS = Kernels(cuda=False, te=False, apex_wgrad=False)


@pytest.fixture
def driver_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(megatron_actor.Kernels, "detect", classmethod(lambda cls: CPU_KERNELS))


def test_gpu_mode_is_the_layout(driver_without_cuda):
    assert gpu_mode("auto", layout_uses_gpus=True) is True
    assert gpu_mode("cuda", layout_uses_gpus=True) is True
    assert gpu_mode("auto", layout_uses_gpus=False) is False
    assert gpu_mode("cpu", layout_uses_gpus=True) is False  # trainer.device=cpu: the engines' CPU settings
    with pytest.raises(ConfigError, match="trainer.device=cuda but the Ray cluster has no GPUs"):
        gpu_mode("cuda", layout_uses_gpus=False)


def test_driver_without_cuda_starts_gpu_engines_on_a_gpu_layout(monkeypatch, driver_without_cuda):
    layout = SimpleNamespace(uses_gpus=True, mode="colocated")
    placement = SimpleNamespace(layout=layout, mode="colocated", describe=lambda: "colocated")
    engines = {}
    monkeypatch.setattr(setup, "reserve", lambda cfg: placement)
    ranks = SimpleNamespace(offload_to_host=lambda: None)  # a colocated start offloads before the engines start
    monkeypatch.setattr(setup, "ActorGroup", lambda p: ranks)
    monkeypatch.setattr(setup, "build_ranks", lambda *args, **kw: None)
    starting = SimpleNamespace(wait=lambda: SimpleNamespace())
    monkeypatch.setattr(
        setup, "launch_engines", lambda cfg, p, *, use_gpu, log_dir: engines.update(use_gpu=use_gpu) or starting
    )
    workers = setup.start_workers(load_config(RECIPES / "luffy_main.yaml"), 0)
    assert engines["use_gpu"] is True and workers.actors is ranks
    layout.uses_gpus = False
    setup.start_workers(load_config(RECIPES / "cpu_demo.yaml"), 0)
    assert engines["use_gpu"] is False


def test_driver_judges_the_kernels_only_where_they_are_the_ranks():
    assert driver_judges_kernels(True, True) and driver_judges_kernels(True, None)  # the driver is on a GPU node
    assert driver_judges_kernels(False, False)  # a CPU cluster: the ranks have no CUDA either
    assert not driver_judges_kernels(False, True)  # GPUs the driver does not see
    assert not driver_judges_kernels(False, None)  # a cluster not reached yet


def _fp8_cfg():
    return load_config(None, ["model.fp8=hybrid", "parallel.use_distributed_optimizer=false"])


def test_driver_without_cuda_leaves_gpu_settings_to_a_gpu_clusters_ranks(monkeypatch, driver_without_cuda):
    monkeypatch.setattr(setup.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(setup.ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 16.0})
    setup.check_megatron_settings(_fp8_cfg())  # the ranks, which have Transformer Engine, check it
    monkeypatch.setattr(setup.ray, "cluster_resources", lambda: {"CPU": 64.0})
    with pytest.raises(ConfigError, match="model.fp8=hybrid needs Transformer Engine"):
        setup.check_megatron_settings(_fp8_cfg())


def test_before_ray_only_a_local_cluster_is_known(monkeypatch, driver_without_cuda):
    monkeypatch.setattr(setup.ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster elsewhere: its GPUs unknown until connected
    assert setup.cluster_has_gpus() is None
    setup.check_megatron_settings(_fp8_cfg())
    monkeypatch.delenv("RAY_ADDRESS")  # a local cluster is this machine, which has no CUDA
    assert setup.cluster_has_gpus() is False
    with pytest.raises(ConfigError, match="model.fp8=hybrid needs Transformer Engine"):
        setup.check_megatron_settings(_fp8_cfg())

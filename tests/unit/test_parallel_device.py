"""Each rank computes on its own GPU: `LOCAL_RANK` -> torch.cuda.set_device before init_process_group, and
NCCL is told the device (GPU readiness item 5). CUDA is simulated: only the calls are checked here."""

import pytest
import torch
import torch.distributed as dist

from luffy_megatron.models import parallel


@pytest.fixture
def fake_gpus(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    return calls


def test_torchrun_rank_binds_its_local_gpu_before_the_process_group(fake_gpus, monkeypatch):
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parallel.ensure_process_group() is True
    assert fake_gpus[0] == ("set_device", 3)
    assert fake_gpus[1] == ("init", "nccl", {"device_id": torch.device("cuda", 3)})


def test_rank_without_local_rank_uses_its_first_visible_gpu(fake_gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parallel.bind_local_device() == torch.device("cuda", 0)
    assert fake_gpus == [("set_device", 0)]


def test_local_rank_beyond_the_visible_gpus_is_an_error(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=8 but this process sees 8 CUDA device"):
        parallel.bind_local_device()


def test_cpu_binds_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.bind_local_device() is None

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
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun: its own store and rendezvous
    assert parallel.ensure_process_group() is True
    assert fake_gpus[0] == ("set_device", 3)
    assert fake_gpus[1] == ("init", "nccl", {"device_id": torch.device("cuda", 3)})


def test_a_rank_started_outside_torchrun_joins_through_a_store_with_a_deadline(fake_gpus, monkeypatch):
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(parallel, "rendezvous_store", lambda: "store")
    assert parallel.ensure_process_group() is True
    assert fake_gpus[1] == (
        "init",
        "nccl",
        {"store": "store", "rank": 11, "world_size": 16, "device_id": torch.device("cuda", 3)},
    )


def test_a_rendezvous_the_other_ranks_never_join_ends_at_its_deadline_naming_the_setting(monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: no rank 0 listens there
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv(parallel.INIT_TIMEOUT_ENV, "1.5")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        parallel.rendezvous_store()
    assert time.monotonic() - t0 < 30
    assert str(err.value).startswith(
        f"rank 1: the torch.distributed rendezvous at 127.0.0.1:{port} (a world of 2 ranks) did not complete "
        "within 1.5s (LUFFY_DIST_INIT_TIMEOUT_S)"
    )


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

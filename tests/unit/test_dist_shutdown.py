"""Pieces of the orderly torch.distributed shutdown that run in one process (the torchrun checks are in
tests/dist/test_exit.py)."""

import pytest
import torch
import torch.distributed as dist

from luffy_megatron.models import parallel


def test_gloo_workers_are_seen_and_idle_ones_are_recognised():
    parallel.ensure_process_group()  # a private world of one (gloo on CPU)
    group = dist.new_group([0])
    try:
        t = torch.ones(4)
        dist.all_reduce(t, group=group)
        assert t.tolist() == [1.0] * 4
        states = parallel.gloo_worker_states()
        assert len(states) >= 2  # at least this group's two worker threads
        assert parallel.wait_gloo_workers_idle(timeout_s=5.0) is True
    finally:
        dist.destroy_process_group(group)


def test_shutdown_is_registered_by_ensure_process_group():
    parallel.ensure_process_group()
    assert parallel._shutdown_registered is True


def test_timeout_setting_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(parallel.SHUTDOWN_TIMEOUT_ENV, raising=False)
    assert parallel.shutdown_timeout_s() == parallel.DEFAULT_SHUTDOWN_TIMEOUT_S
    monkeypatch.setenv(parallel.SHUTDOWN_TIMEOUT_ENV, "7.5")
    assert parallel.shutdown_timeout_s() == 7.5
    monkeypatch.setenv(parallel.SHUTDOWN_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LUFFY_DIST_SHUTDOWN_TIMEOUT_S='soon'"):
        parallel.shutdown_timeout_s()


def test_groups_are_found_inside_containers():
    parallel.ensure_process_group()
    world = dist.group.WORLD
    assert parallel._holds_group(world)
    assert parallel._holds_group({2: [None, world]}) and parallel._holds_group((1, {"g": world}))
    assert not parallel._holds_group([None, 1, {"a": [2]}]) and not parallel._holds_group(None)

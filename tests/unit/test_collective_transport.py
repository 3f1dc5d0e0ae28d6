"""`sync.collective.CollectiveTransport` on a failed broadcast (an engine worker died mid-sync): it closes its
weight group (a group with a dead member) and the next sync makes every sender build its group anew (the set-up
is collective over the senders). The gloo side, with real processes, is tests/dist/test_weight_group_faults.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.convert.export import FlatBucket
from luffy_megatron.sync.collective import CollectiveTransport


class Work:
    def __init__(self, log, k):
        self.log, self.k = log, k

    def wait(self):
        self.log.append(("wait", self.k))


class Group:
    """Stands for a WeightGroup whose broadcast of bucket `fail_at` fails (a member died)."""

    def __init__(self, fail_at=None):
        self.fail_at, self.log, self.closed = fail_at, [], False

    def broadcast(self, tensor):
        k = len([e for e in self.log if e[0] == "broadcast"])
        if k == self.fail_at:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
        self.log.append(("broadcast", k))
        return Work(self.log, k)

    def close(self):
        self.closed = True


def ctx_of(buckets, gathered=None):
    return SimpleNamespace(
        buckets=buckets,
        is_driver=False,
        device=torch.device("cpu"),
        all_gather=lambda obj: gathered if gathered is not None else [obj],
    )


def filling(transport, buckets):
    for b in buckets:
        yield b, transport.buffer_for(b)  # the buffer of bucket k: slot k % 2, free once bucket k-2 is sent


def test_a_failed_broadcast_closes_the_group_and_the_error_reaches_the_caller():
    buckets = [FlatBucket(owner=0, nbytes=64) for _ in range(4)]
    transport = CollectiveTransport(fleet=SimpleNamespace(engines=[]))
    group = transport.group = Group(fail_at=2)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        transport.transfer(ctx_of(buckets), filling(transport, buckets))
    assert group.closed and transport.group is None and transport.inflight == [None, None]
    # the next sync: this sender lacks its group, so it builds one (with the other senders)
    assert transport._needs_setup(ctx_of(buckets)) is True


def test_a_full_transfer_waits_for_both_buffers_and_keeps_the_group():
    buckets = [FlatBucket(owner=0, nbytes=64) for _ in range(3)]
    transport = CollectiveTransport(fleet=SimpleNamespace(engines=[]))
    group = transport.group = Group()
    transport.transfer(ctx_of(buckets), filling(transport, buckets))
    # bucket 2 reuses bucket 0's buffer only after bucket 0's broadcast ended; the last two are waited for
    assert group.log == [("broadcast", 0), ("broadcast", 1), ("wait", 0), ("broadcast", 2), ("wait", 2), ("wait", 1)]
    assert not group.closed and transport.group is group
    assert transport._needs_setup(ctx_of(buckets)) is False


def test_every_sender_rebuilds_when_one_lost_its_group():
    transport = CollectiveTransport(fleet=SimpleNamespace(engines=[]))
    group = transport.group = Group()
    # stage 0 (this one) still has its group, stage 1's failed broadcast closed its own
    assert transport._needs_setup(ctx_of([], gathered=[False, True])) is True
    assert group.closed and transport.group is None

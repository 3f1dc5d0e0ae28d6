"""The sender side every transport shares (`sync.base.Transport.run` over a `SyncContext`'s fill generator),
and the object-store transport's bucket hand-off, without Megatron, Ray or engines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.convert.export import FlatBucket, FlatEntry
from luffy_megatron.sync import base
from luffy_megatron.sync.object_store import ObjectStoreTransport


def _context(monkeypatch, role: str, produced: list) -> base.SyncContext:
    """A `SyncContext` of one stage with three buckets whose export (collective over the TP group in real life)
    logs every bucket it fills and the size of the buffer it was filled into (None: a contributor's)."""

    def export(buckets, arch, buffer_for, *, everywhere, stats, shared):
        for k, bucket in enumerate(buckets):
            buf = buffer_for(bucket)
            produced.append((k, None if buf is None else buf.numel()))
            yield bucket, buf

    monkeypatch.setattr(base, "export_flat_buckets", export)
    ctx = object.__new__(base.SyncContext)
    ctx.role, ctx.arch, ctx.stats, ctx.device = role, None, None, torch.device("cpu")
    ctx.buckets = [SimpleNamespace(nbytes=16 * (k + 1)) for k in range(3)]
    ctx.senders_group, ctx.sender_ranks, ctx.pp_size = None, [0], 1
    ctx._buffer_for, ctx.fill_mode = (lambda bucket: None), ""
    return ctx


class _Transport(base.Transport):
    """Takes `take` buckets, then raises `error` (if any)."""

    def __init__(self, take: int, error=None):
        super().__init__(SimpleNamespace(engines=[]))
        self.take, self.error, self.sent = take, error, []

    def buffer_for(self, bucket):
        return torch.zeros(64, dtype=torch.uint8)

    def transfer(self, ctx, filling):
        for _ in range(self.take):
            self.sent.append(next(filling)[0].nbytes)
        if self.error is not None:
            raise self.error


def test_every_rank_runs_its_fill_generator_to_the_end_and_only_senders_send(monkeypatch):
    produced = []
    assert _Transport(3).run(_context(monkeypatch, "contributor", produced)) == {}
    assert produced == [(0, None), (1, None), (2, None)]  # shards sent, nothing handed to the transport

    produced = []
    assert _Transport(3).run(_context(monkeypatch, "idle", produced)) == {}
    assert produced == []

    produced, transport = [], _Transport(3)
    assert transport.run(_context(monkeypatch, "sender", produced)) == {}
    assert transport.sent == [16, 32, 48] and produced == [(0, 64), (1, 64), (2, 64)]


def test_a_transport_that_fails_or_stops_early_still_drains_the_fill_generator(monkeypatch):
    """The TP peers are inside the (collective) export: a sender whose transport failed after the first bucket
    runs the rest into a scratch buffer so they are let go, and raises its own error."""
    produced, transport = [], _Transport(1, KeyError("bad name"))
    ctx = _context(monkeypatch, "sender", produced)
    with pytest.raises(KeyError, match="bad name"):
        transport.run(ctx)
    assert transport.sent == [16]
    assert produced == [(0, 64), (1, 32), (2, 48)]  # the rest went into the scratch buffer, grown as needed


def test_object_store_puts_each_bucket_once_from_host_memory_and_keeps_at_most_two_in_flight(monkeypatch):
    import ray

    log = []
    monkeypatch.setattr(ray, "put", lambda obj: log.append(("put", obj.copy())) or f"ref{len(log)}")

    class Engine:
        def __init__(self, index):
            self.call = SimpleNamespace(
                remote=lambda method, ref, entries: log.append((method, index, ref, entries)) or (index, ref)
            )

    ctx = SimpleNamespace(device=torch.device("cpu"), engine_get=lambda refs, what: log.append(("wait", refs)))
    transport = ObjectStoreTransport(SimpleNamespace(engines=[Engine(0), Engine(1)]))
    transport._ctx_device = ctx.device
    buckets = [FlatBucket(owner=0, entries=[FlatEntry(f"w{k}", "float32", (2,), 0)], nbytes=256) for k in range(3)]

    def filling():
        for k, bucket in enumerate(buckets):
            buf = transport.buffer_for(bucket)
            buf[:8].view(torch.float32).copy_(torch.tensor([k, k + 0.5]))
            yield bucket, buf

    transport.transfer(ctx, filling())
    puts = [e for e in log if e[0] == "put"]
    assert len(puts) == 3 and all(p[1].dtype.name == "uint8" and p[1].shape == (256,) for p in puts)  # host views
    assert [torch.from_numpy(p[1][:8]).view(torch.float32).tolist() for p in puts] == [[k, k + 0.5] for k in range(3)]
    shape = [e[0] if e[0] != "load_flat_bucket" else f"load{e[1]}:{e[3][0][0]}" for e in log]
    # bucket k+1 is put and its loads started before the engines' loads of bucket k are waited for
    assert shape == [
        "put",
        "load0:w0",
        "load1:w0",
        "put",
        "load0:w1",
        "load1:w1",
        "wait",
        "put",
        "load0:w2",
        "load1:w2",
        "wait",
        "wait",
    ]
    waits = [e[1] for e in log if e[0] == "wait"]
    assert waits == [[(0, "ref1"), (1, "ref1")], [(0, "ref4"), (1, "ref4")], [(0, "ref8"), (1, "ref8")]]

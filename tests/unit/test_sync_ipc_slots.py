"""The CUDA IPC weight sync's buffers (`sync.shared_memory`), on CPU with the CUDA calls replaced: the sender
makes its two slots once, at the plan's largest bucket, and exports their handles once; three syncs, and an
engine restarted in between, use the same slots and the same handles; every engine worker maps each slot once
per sync and maps nothing once the sync has ended (`luffy_finish_weight_update`). The CPU path's /dev/shm slots
follow the same rule (`SlotPair`). Real CUDA memory across processes: tests/gpu/test_gpu_transports.py."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.sync import shared_memory as sm
from tests.ipc_fleet import FakeEngine, RecordingWorker, bucket_plan, ctx_of, fill_buckets

CUDA0 = torch.device("cuda", 0)  # only a name here: every CUDA call is replaced (`FakeCuda`)


class FakeCuda:
    """The CUDA calls of both sides: slots are CPU tensors, a handle names its slot, and a consumer's mapping
    is a new tensor object over the slot's memory (tracked by weak reference, as the mapping's lifetime)."""

    def __init__(self):
        self.made, self.exports, self.opens, self.collects, self.aborts = [], [], [], 0, []
        self.by_handle: dict = {}
        self.mappings: list = []

    def new_slot(self, nbytes, device):
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        self.made.append(buf)
        return buf

    def export(self, buf):
        handle = f"handle-{len(self.exports)}"
        self.by_handle[handle] = buf
        self.exports.append(handle)
        return ("tensor_cls", buf.shape, (1,), 0, "storage_cls", torch.uint8, 0, handle, buf.numel(), 0, False)

    def rebuild(self, args):
        self.opens.append(args[7])
        mapping = self.by_handle[args[7]].view(-1)
        self.mappings.append(weakref.ref(mapping))
        return mapping

    def collect(self):
        self.collects += 1


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(sm, "_IPC_SLOTS", {})
    monkeypatch.setattr(sm, "new_ipc_slot", fake.new_slot)
    monkeypatch.setattr(sm, "export_ipc_slot", fake.export)
    monkeypatch.setattr(sm, "rebuild_ipc_tensor", fake.rebuild)
    monkeypatch.setattr(sm, "collect_ipc", fake.collect)
    monkeypatch.setattr(sm, "gpu_uuid", lambda device: RecordingWorker(device).uuid)
    # after a failure the driver closes the engines' sessions through Ray: recorded here instead
    monkeypatch.setattr(sm.SharedMemoryTransport, "abort", lambda self, ctx: fake.aborts.append(ctx.rank))
    return fake


def _sync(monkeypatch, transport, sizes, value_of) -> dict:
    buckets = bucket_plan(sizes)
    monkeypatch.setattr(sm, "plan_flat_buckets", lambda *a, **kw: buckets)
    monkeypatch.setattr(sm, "export_flat_buckets", fill_buckets(buckets, value_of))
    return transport._run_ipc(ctx_of(CUDA0))


def test_the_same_slots_and_handles_serve_three_syncs_and_no_worker_maps_them_after_a_sync(one_rank, cuda, monkeypatch):
    worker = RecordingWorker(CUDA0)
    transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(worker)]))
    sizes = [1000, 60_000, 500]  # the middle bucket is one tensor larger than the others (an embedding)
    for sync in range(3):
        done = _sync(monkeypatch, transport, sizes, lambda k, sync=sync: 10 * sync + k + 1)
        assert done["weight_version"] == sync + 1
        # made once, at the largest bucket (not the first bucket, not the bucket size), exported once
        assert len(cuda.made) == 2 and [b.numel() for b in cuda.made] == [240_000, 240_000]
        assert len(cuda.exports) == 2 and sm.ipc_slot_bytes() == 2 * 240_000
        assert [b is m for b, m in zip(sm.ipc_slots(CUDA0).bufs, cuda.made)] == [True, True]
        # buckets 0 and 2 in slot 0, bucket 1 in slot 1; each slot mapped once this sync, under the same handle
        loads = worker.loads[3 * sync :]
        assert [slot for slot, _, _ in loads] == [0, 1, 0]
        assert [sums for _, _, sums in loads] == [
            {f"w{k}": float(n * (10 * sync + k + 1))} for k, n in enumerate(sizes)
        ]
        assert cuda.opens[2 * sync :] == ["handle-0", "handle-1"]
        assert {h for _, h, _ in loads} == {h for _, h, _ in worker.loads[:3]}  # the same key every sync
        # the sync is over: the worker holds no importer and no mapping of either slot
        assert worker.held_after_finish[sync] == 0
        gc.collect()
        assert all(ref() is None for ref in cuda.mappings)
        assert cuda.collects == sync + 1  # the sender collects after the session closed


def test_a_restarted_engine_maps_the_same_slots_and_a_larger_plan_makes_new_ones(one_rank, cuda, monkeypatch):
    first = RecordingWorker(CUDA0)
    _sync(monkeypatch, sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(first)])), [400, 400], float)
    # the engine restarted: a new engine, so a new transport (`weights.transport_for`), the same process and GPU
    second = RecordingWorker(CUDA0)
    transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(second)]))
    _sync(monkeypatch, transport, [400, 400], float)
    assert len(cuda.made) == 2 and len(cuda.exports) == 2
    assert [h for _, h, _ in second.loads] == [h for _, h, _ in first.loads]
    assert second.held_after_finish == [0]
    # the model grew (another plan): both slots are made and exported anew, between syncs
    _sync(monkeypatch, transport, [400, 900], float)
    assert [b.numel() for b in cuda.made] == [1600, 1600, 3600, 3600] and len(cuda.exports) == 4
    assert cuda.opens[-2:] == ["handle-2", "handle-3"] and second.held_after_finish == [0, 0]
    assert sm.release_ipc_slots() == 2 * 3600 and sm.ipc_slot_bytes() == 0


def test_a_worker_releases_its_mappings_even_when_closing_the_session_fails(one_rank, cuda, monkeypatch):
    worker = RecordingWorker(CUDA0)
    transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(worker)]))
    worker.finish_fails = True
    with pytest.raises(RuntimeError, match="layerwise reload failed"):
        _sync(monkeypatch, transport, [100, 100, 100], float)
    assert worker.held_after_finish == [0]
    gc.collect()
    assert all(ref() is None for ref in cuda.mappings)


def test_an_importer_opens_a_slot_once_per_handle_and_close_releases_it(cuda):
    a, b = cuda.export(torch.zeros(8, dtype=torch.uint8)), cuda.export(torch.zeros(8, dtype=torch.uint8))
    importers: dict = {}
    imp = importers.setdefault(0, sm.SlotImporter())
    first = imp.rebuild(list(a))
    assert imp.rebuild(list(a)) is first and cuda.opens == ["handle-0"]  # bucket after bucket: one open
    imp.rebuild(list(b))  # another buffer: the old mapping goes, the new one is opened
    assert cuda.opens == ["handle-0", "handle-1"]
    del first
    gc.collect()
    assert cuda.mappings[0]() is None and cuda.mappings[1]() is not None
    assert sm.close_ipc_imports(importers) == 1 and importers == {}
    gc.collect()
    assert cuda.mappings[1]() is None
    assert sm.close_ipc_imports(importers) == 0 and sm.close_ipc_imports(None) == 0


def test_slot_pair_keeps_its_buffers_until_a_plan_needs_more():
    made, freed, waited = [], [], []
    pair = sm.SlotPair(make=lambda n, i: made.append((n, i)) or torch.zeros(n), free=freed.append)
    assert pair.ensure(100) is True and made == [(100, 0), (100, 1)]
    bufs = list(pair.bufs)
    assert pair.ensure(100) is False and pair.ensure(40) is False and pair.bufs == bufs and pair.made == 1
    assert pair.ensure(101, before_free=waited.append) is True
    assert waited == [0, 1] and [f is b for f, b in zip(freed, bufs)] == [True, True] and pair.made == 2
    assert pair.nbytes == 101 and pair.held_bytes == 202
    assert pair.close() == 202 and pair.bufs == [None, None] and pair.held_bytes == 0


def test_the_cpu_path_keeps_its_two_shm_files_across_syncs(tmp_path):
    transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[]))
    transport._ctx = SimpleNamespace(pp_rank=0)
    try:
        transport._ensure_slots(4096)
        paths, made = [s.path for s in transport.slots.bufs], transport.slots_made
        transport._ensure_slots(4096)
        transport._ensure_slots(1024)
        assert [s.path for s in transport.slots.bufs] == paths and transport.slots_made == made
        transport._ensure_slots(8192)  # a larger plan: new files, which the TP peers map again
        assert [s.path for s in transport.slots.bufs] != paths and transport.slots_made != made
        assert [s.nbytes for s in transport.slots.bufs] == [8192, 8192]
    finally:
        transport.close()
    assert transport.slots.bufs == [None, None]


def _w(uuid: str, tp_rank, tp_size, rank: int = 0) -> dict:
    return {"rank": rank, "gpu_uuid": uuid, "tp_rank": tp_rank, "tp_size": tp_size}


def test_ranks_send_only_their_own_shards_when_every_engine_worker_has_its_gpus_trainer_tp_rank():
    ranks = [("g0", 0, 2), ("g1", 1, 2), ("g2", 0, 2), ("g3", 1, 2)]  # trainer: TP 2 x DP 2, one rank per GPU
    matched = [[_w("g0", 0, 2, 0), _w("g1", 1, 2, 1)], [_w("g2", 0, 2, 0), _w("g3", 1, 2, 1)]]
    assert sm.ipc_serving_plan(matched, ranks) == ([[0, 1], [2, 3]], True, "")
    # engine TP rank 1 on the GPU of trainer TP rank 0: its loader would narrow rank 1's part, which is not there
    swapped = [[_w("g0", 1, 2, 1), _w("g1", 0, 2, 0)], matched[1]]
    serving, own, why = sm.ipc_serving_plan(swapped, ranks)
    assert serving == [[0, 1], [2, 3]] and not own
    assert why == "worker 1 of engine 0 (TP rank 1) is on the GPU of trainer rank 0 (TP rank 0)"
    one_engine_tp4 = [[_w(f"g{i}", i, 4, i) for i in range(4)]]
    assert sm.ipc_serving_plan(one_engine_tp4, ranks) == ([[0, 1, 2, 3]], False, "engine 0 runs TP 4, the trainer TP 2")
    unreported = [[_w("g0", None, None, 0), _w("g1", None, None, 1)]]
    assert sm.ipc_serving_plan(unreported, ranks)[1:] == (False, "worker 0 of engine 0 reports no TP rank")
    # trainer TP 1: nothing is gathered either way, nothing to say
    assert sm.ipc_serving_plan([[_w("g0", 0, 1)]], [("g0", 0, 1)]) == ([[0]], False, "")
    error, own, _ = sm.ipc_serving_plan([[_w("g9", 0, 2)]], ranks)
    assert isinstance(error, str) and "no Megatron rank uses" in error and not own


def test_the_ipc_sender_exports_own_shards_only_with_matching_tp_ranks_and_says_why_not_once(
    one_rank, cuda, monkeypatch, caplog
):
    monkeypatch.setattr(sm, "_LOGGED", set())
    buckets = bucket_plan([100, 100])
    monkeypatch.setattr(sm, "plan_flat_buckets", lambda *a, **kw: buckets)
    seen = []
    for worker_tp_rank in (0, 1, 1):  # a trainer of TP size 2 seen from its TP rank 0 (the other rank not here)
        export = fill_buckets(buckets, float)
        monkeypatch.setattr(sm, "export_flat_buckets", export)
        worker = RecordingWorker(CUDA0, tp_rank=worker_tp_rank, tp_size=2)
        transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(worker)]))
        ctx = ctx_of(CUDA0)
        ctx.tp_size = 2
        with caplog.at_level("WARNING", logger=sm.log.name):
            transport._run_ipc(ctx)
        seen += export.own_shards
        assert [sums for _, _, sums in worker.loads] == [{"w0": 0.0}, {"w1": 100.0}]
    assert seen == [True, False, False]
    why = [r.getMessage() for r in caplog.records if "full tensors" in r.getMessage()]
    assert why == [
        "weight sync (CUDA IPC): every rank builds full tensors: worker 0 of engine 0 (TP rank 1) is on the GPU of "
        "trainer rank 0 (TP rank 0)"
    ]

"""Stand-ins for the engines of the CUDA IPC weight sync (`sync.shared_memory`), shared by tests/unit (CPU, the
CUDA calls replaced) and tests/gpu (real CUDA IPC between two processes).

`FakeEngine` answers the calls the sender makes on an engine actor (`begin_weight_update`, `call("worker_rpc" |
"load_weights_rpc", ...)`, `finish_weight_update`) at once, on a worker object that runs the real
`LuffyWorkerExtension` IPC methods (`luffy_load_ipc`, `luffy_finish_weight_update`) with vLLM's parts replaced
(`RecordingWorker._luffy_load_flat` records what each bucket held; no vLLM is needed)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from luffy_megatron.convert.export import FlatBucket, FlatEntry, views_of
from luffy_megatron.rollout.worker_extension import LuffyWorkerExtension

GPU_UUID = "GPU-00000000-fake"


class RecordingWorker(LuffyWorkerExtension):
    """One engine worker: records, per bucket, (slot, handle string, {tensor name: sum}), and what it still
    mapped after each finished session."""

    def __init__(self, device, uuid: str = GPU_UUID, tp_rank=None, tp_size=None):
        self.device, self.uuid, self.rank = device, uuid, 0
        self.tp_rank, self.tp_size = tp_rank, tp_size  # what vLLM's worker would report (None: not reported)
        self.loads: list = []
        self.held_after_finish: list = []
        self.finish_fails = False

    def luffy_worker_info(self) -> dict:
        return {
            "rank": 0,
            "pid": 0,
            "hostname": "",
            "device": str(self.device),
            "gpu_uuid": self.uuid,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
        }

    def _luffy_load_flat(self, flat, entries) -> int:
        self.loads[-1][-1].update({name: float(t.double().sum()) for name, t in views_of(flat, entries)})
        return len(entries)

    def luffy_load_ipc(self, handles_b64: str, slot: int, entries: list) -> int:
        self.loads.append((int(slot), handles_b64, {}))
        return super().luffy_load_ipc(handles_b64, slot, entries)

    def begin(self) -> None:
        pass

    def record(self) -> tuple:
        """What this worker loaded and what it still mapped after each session (read from another process)."""
        return self.loads, self.held_after_finish

    def _luffy_finish_session(self) -> dict:
        """vLLM's part of closing the session (not here: no model); `finish_fails` makes it raise."""
        if self.finish_fails:
            raise RuntimeError("layerwise reload failed")
        return {"load": "layerwise", "in_place": 0, "concatenated": 0, "incomplete": []}

    def finish(self) -> dict:
        try:
            return self.luffy_finish_weight_update()
        finally:
            self.held_after_finish.append(len(getattr(self, "_luffy_ipc_importers", {}) or {}))


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeEngine:
    """An engine actor whose calls run at once on `worker` (the value stands for the object ref)."""

    def __init__(self, worker):
        self.worker = worker
        self.versions = 0
        self.begin_weight_update = _Remote(lambda **kw: worker.begin())
        self.finish_weight_update = _Remote(self._finish)
        self.call = _Remote(self._call)

    def _call(self, rpc: str, method: str, *args):
        if rpc == "worker_rpc":
            return [getattr(self.worker, method)(*args)]
        assert rpc == "load_weights_rpc", rpc
        return getattr(self.worker, method)(*args[1:])  # args[0]: the entries the engine checks

    def _finish(self, partial: bool = False) -> dict:
        self.worker.finish()
        self.versions += 1
        return {"weight_version": self.versions, "num_tensors": 0, "load": "layerwise"}


def bucket_plan(sizes: list) -> list:
    """One float32 tensor per bucket, `sizes[k]` elements each."""
    out = []
    for k, n in enumerate(sizes):
        b = FlatBucket(owner=0)
        b.entries.append(FlatEntry(f"w{k}", "float32", (int(n),), 0))
        b.nbytes = b.tensor_bytes = 4 * int(n)
        out.append(b)
    return out


def fill_buckets(buckets, value_of):
    """`export_flat_buckets` stand-in: writes `value_of(k)` into every element of bucket k, in its buffer."""

    def export(plan, arch, buffer_for, *, everywhere, stats=None, shared=False, own_shards=False):
        export.own_shards.append(own_shards)
        for k, bucket in enumerate(plan):
            buf = buffer_for(bucket)
            for e in bucket.entries:
                e.view(buf).fill_(value_of(k))
            yield bucket, buf

    export.own_shards = []  # the `own_shards` of every call
    return export


def ctx_of(device, engine_get=None):
    """The part of a `SyncContext` the CUDA IPC sender reads (rank 0 of a one-rank world)."""
    return SimpleNamespace(
        chunks=[],
        arch=None,
        bucket_bytes=1 << 20,
        dtype=torch.float32,
        stats=None,
        device=device,
        rank=0,
        tp_rank=0,
        tp_size=1,
        is_driver=True,
        engine_get=engine_get or (lambda refs, what: refs),
    )

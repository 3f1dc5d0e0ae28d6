"""GPU paths of the weight-sync transports (skipped without CUDA; see conftest.py).

- shared_memory on GPU: a flat bucket in one process's CUDA memory, its handle encoded as the transport sends
  it (`encode_ipc_handles`), opened in another process exactly as the worker extension does
  (`open_ipc_bucket`: the worker's `SlotImporter`, this GPU's UUID, the local device index), read in place:
  a second bucket written into the same buffer is seen through the same mapping without a new handle;
- the exporter on CUDA: the bucket assembled on the GPU equals the conversion export, tensor for tensor;
- collective on GPU (2+ GPUs): a bucket broadcast through `WeightGroup` (vLLM's StatelessProcessGroup +
  PyNcclCommunicator) arrives bit-exact in the receiver's buffer.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp


def _consumer(queue_in, queue_out):
    from luffy_megatron.convert.export import views_of
    from luffy_megatron.sync.shared_memory import open_ipc_bucket

    torch.cuda.set_device(0)
    importers: dict = {}
    while True:
        msg = queue_in.get()
        if msg is None:
            break
        handles, slot, entries = msg
        flat = open_ipc_bucket(handles, slot, torch.device("cuda", 0), importers)
        queue_out.put([(name, float(t.double().sum()), t.device.type) for name, t in views_of(flat, entries)])


def _bucket(flat, seed):
    from luffy_megatron.convert.export import FlatEntry

    g = torch.Generator(device="cuda").manual_seed(seed)
    entries = [FlatEntry("a", "bfloat16", (64, 32), 0), FlatEntry("b", "float32", (100,), 4096)]
    sums = []
    for e in entries:
        v = e.view(flat)
        v.copy_(torch.randn(v.shape, generator=g, device="cuda", dtype=torch.float32).to(v.dtype))
        sums.append((e.name, float(v.double().sum()), "cuda"))
    torch.cuda.synchronize()
    return [e.to_wire() for e in entries], sums


def test_cuda_ipc_bucket_is_read_in_place_by_another_process():
    from torch.multiprocessing.reductions import reduce_tensor

    from luffy_megatron.sync.shared_memory import encode_ipc_handles, gpu_uuid

    ctx = mp.get_context("spawn")
    qin, qout = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_consumer, args=(qin, qout), daemon=True)
    proc.start()
    try:
        flat = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
        handles = encode_ipc_handles({gpu_uuid(flat.device): reduce_tensor(flat)[1]})
        entries, want = _bucket(flat, seed=0)
        qin.put((handles, 0, entries))
        assert qout.get(timeout=120) == want
        entries, want2 = _bucket(flat, seed=1)  # the next bucket, same buffer and handle
        qin.put((handles, 0, entries))
        got = qout.get(timeout=120)
        assert got == want2 and got != want
    finally:
        qin.put(None)
        proc.join(timeout=60)


def test_export_assembles_the_bucket_on_cuda_like_the_conversion_export(tmp_path, megatron_world):
    from luffy_megatron.convert.export import export_flat_buckets, iter_hf_weights, plan_flat_buckets
    from luffy_megatron.convert.weights import load_hf_weights
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
    from tests.dist.tiny_models import make_tiny_model

    hf = make_tiny_model("qwen2", tmp_path / "qwen2")
    arch = read_hf_arch(hf)
    chunks = build_model_chunks(arch, params_dtype=torch.float32)
    load_hf_weights(chunks, arch, hf)
    chunks = [c.cuda() for c in chunks]
    want = {n: t.cpu().to(torch.bfloat16) for n, t in iter_hf_weights(chunks, arch)}
    buckets = plan_flat_buckets(chunks, arch, bucket_bytes=64 * 1024, dtype=torch.bfloat16, all_stages=False)
    buf = torch.empty(max(b.nbytes for b in buckets), dtype=torch.uint8, device="cuda")
    got = {}
    for bucket, flat in export_flat_buckets(buckets, arch, lambda b: buf, everywhere=False):
        assert flat.device.type == "cuda"
        got.update({e.name: e.view(flat).cpu().clone() for e in bucket.entries})
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def _nccl_peer(rank, port, out):
    from luffy_megatron.sync.collective import WeightGroup

    torch.cuda.set_device(rank)
    sock = None
    if rank == 0:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    group = WeightGroup.create(
        host="127.0.0.1",
        port=port,
        rank=rank,
        world_size=2,
        backend="nccl",
        timeout_s=120,
        listen_socket=sock,
        device=torch.device("cuda", rank),
    )
    g = torch.Generator(device="cuda").manual_seed(7)
    data = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda", generator=g)
    buf = data.clone() if rank == 0 else torch.zeros_like(data)
    group.broadcast(buf).wait()
    out.put((rank, bool(torch.equal(buf, data))))
    group.close()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_weight_group_broadcasts_a_bucket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_nccl_peer, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: True, 1: True}


# ------------------------------------------------------------------ N3/N12: the IPC slots across syncs


def _ipc_engine_worker(queue_in, queue_out):
    """An engine worker in its own process: the real IPC methods of the worker extension (`RecordingWorker`)."""
    from luffy_megatron.sync.shared_memory import gpu_uuid
    from tests.ipc_fleet import RecordingWorker

    torch.cuda.set_device(0)
    worker = RecordingWorker(torch.device("cuda", 0), uuid=gpu_uuid(torch.device("cuda", 0)))
    while True:
        msg = queue_in.get()
        if msg is None:
            break
        name, args = msg
        try:
            queue_out.put(("ok", getattr(worker, name)(*args)))
        except Exception as err:  # noqa: BLE001 - reported to the sender
            queue_out.put(("error", repr(err)))


class _WorkerElsewhere:
    """Forwards every call the fake engine makes on its worker to `_ipc_engine_worker`'s process."""

    def __init__(self, queue_in, queue_out):
        self._qin, self._qout = queue_in, queue_out

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args):
            self._qin.put((name, args))
            status, out = self._qout.get(timeout=120)
            if status != "ok":
                raise RuntimeError(out)
            return out

        return call


def test_ipc_slots_serve_three_syncs_with_memory_reserved_flat(tmp_path, monkeypatch):
    """The CUDA IPC sender (`SharedMemoryTransport._run_ipc`, one rank) and an engine worker in another process:
    three syncs use the same two slots (same addresses, made at the largest bucket), the sender's
    `memory_reserved` does not grow after the first, the worker maps nothing after each sync, and the slots,
    once let go, are freed at once (not kept in torch's IPC limbo)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from luffy_megatron.sync import shared_memory as sm
    from tests.ipc_fleet import FakeEngine, bucket_plan, ctx_of, fill_buckets

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    monkeypatch.setattr(sm, "_IPC_SLOTS", {})
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    sizes = [1 << 20, 8 << 20, 1 << 20]  # float32: 4, 32 and 4 MiB; the middle one stands for the embedding
    ctx = mp.get_context("spawn")
    qin, qout = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_engine_worker, args=(qin, qout), daemon=True)
    proc.start()
    try:
        worker = _WorkerElsewhere(qin, qout)
        transport = sm.SharedMemoryTransport(SimpleNamespace(engines=[FakeEngine(worker)]))
        reserved, addresses = [], []
        for sync in range(3):
            buckets = bucket_plan(sizes)
            monkeypatch.setattr(sm, "plan_flat_buckets", lambda *a, buckets=buckets, **kw: buckets)
            monkeypatch.setattr(
                sm, "export_flat_buckets", fill_buckets(buckets, lambda k, s=sync: float(10 * s + k + 1))
            )
            transport._run_ipc(ctx_of(device))
            torch.cuda.synchronize()
            reserved.append(torch.cuda.memory_reserved(device))
            addresses.append([b.data_ptr() for b in sm.ipc_slots(device).bufs])
        loads, held = worker.record()
        assert [b.numel() for b in sm.ipc_slots(device).bufs] == [32 << 20, 32 << 20]
        assert addresses == [addresses[0]] * 3, addresses
        assert reserved == [reserved[0]] * 3, reserved
        assert held == [0, 0, 0]
        assert [sums for _, _, sums in loads] == [
            {f"w{k}": float(n * (10 * s + k + 1))} for s in range(3) for k, n in enumerate(sizes)
        ]
        allocated = torch.cuda.memory_allocated(device)
        assert sm.release_ipc_slots() == 2 * (32 << 20)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) == allocated - 2 * (32 << 20)
    finally:
        qin.put(None)
        proc.join(timeout=60)
        if own_group:
            dist.destroy_process_group()


# ------------------------------------------------------------------ N6: a receiver killed mid-sync (NCCL)

KILL_TIMEOUT_S = 15.0  # the weight group's deadline here (rollout.request_timeout_s in a run)


def _report(out, name: str, row: dict) -> None:
    import json
    import time
    from pathlib import Path

    tmp = Path(out) / f"{name}.tmp"
    tmp.write_text(json.dumps({"at": time.time(), **row}))
    tmp.replace(Path(out) / f"{name}.json")


def _nccl_killed_peer(rank, port, rebuild_port, out, role):
    """`sender` broadcasts until a broadcast fails, then builds a new group (`rebuild_port`) and broadcasts once
    more; `dies` receives two buckets and SIGKILLs itself; `rejoins` joins the new group and receives."""
    import os
    import signal
    import time

    from luffy_megatron.sync.collective import WeightGroup

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)

    def group_on(p, sock=None):
        return WeightGroup.create(
            host="127.0.0.1",
            port=p,
            rank=rank,
            world_size=2,
            backend="nccl",
            timeout_s=KILL_TIMEOUT_S,
            listen_socket=sock,
            device=device,
            name=f"kill-test-{p}",
        )

    g = torch.Generator(device="cuda").manual_seed(7)
    data = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda", generator=g)
    if role == "rejoins":
        group = group_on(rebuild_port)
        buf = torch.zeros_like(data)
        group.broadcast(buf).wait()
        _report(out, role, {"equal": bool(torch.equal(buf, data))})
        return
    sock = None
    if role == "sender":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    group = group_on(port, sock)
    buf = data.clone() if role == "sender" else torch.zeros_like(data)
    for k in range(50):
        try:
            group.broadcast(buf).wait()
        except Exception as err:  # noqa: BLE001 - reported to the test
            _report(out, role, {"bucket": k, "error": f"{type(err).__name__}: {err}"[:400], "aborts": group.aborts})
            group.close()
            again = group_on(rebuild_port)  # what the next sync does
            again.broadcast(data).wait()
            _report(out, "rebuilt", {"ok": True})
            return
        if role == "dies" and k == 2:
            _report(out, role, {"bucket": k})
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
    _report(out, role, {"bucket": 50, "error": None})


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_broadcast_to_a_killed_receiver_fails_within_the_timeout_and_the_group_is_rebuilt(tmp_path):
    import json
    import signal
    import time

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    sender = ctx.Process(target=_nccl_killed_peer, args=(0, ports[0], ports[1], str(tmp_path), "sender"))
    dies = ctx.Process(target=_nccl_killed_peer, args=(1, ports[0], ports[1], str(tmp_path), "dies"))
    rejoins = ctx.Process(target=_nccl_killed_peer, args=(1, ports[0], ports[1], str(tmp_path), "rejoins"))
    procs = [sender, dies]
    for p in procs:
        p.start()
    t0 = time.time()
    try:
        dies.join(timeout=240)
        assert dies.exitcode == -signal.SIGKILL
        rejoins.start()  # the restarted engine worker, waiting in the new group's rendezvous
        procs.append(rejoins)
        files = [tmp_path / f"{n}.json" for n in ("dies", "sender", "rebuilt", "rejoins")]
        while not all(f.exists() for f in files) and time.time() - t0 < 240 + 2 * KILL_TIMEOUT_S:
            time.sleep(0.2)
        got = {f.stem: json.loads(f.read_text()) for f in files if f.exists()}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert set(got) == {"dies", "sender", "rebuilt", "rejoins"}, got
    sent = got["sender"]
    # the sender's wait ended at the deadline (not never), naming the group and the setting, and aborted once
    # (a bucket or two after the death may still complete into the dead receiver's NCCL buffers)
    assert sent["error"].startswith("TimeoutError") and "rollout.request_timeout_s" in sent["error"], sent
    assert f"kill-test-{ports[0]}" in sent["error"] and sent["aborts"] == 1 and sent["bucket"] >= 3, sent
    assert KILL_TIMEOUT_S - 1 <= sent["at"] - got["dies"]["at"] < KILL_TIMEOUT_S + 30, (sent, got["dies"])
    # the next sync's group works: a new receiver gets the sender's bytes
    assert got["rebuilt"]["ok"] and got["rejoins"]["equal"]

"""GPU paths of the weight-sync transports (skipped without CUDA; see conftest.py).

- shared_memory on GPU: a flat bucket in one process's CUDA memory, its handle encoded as the transport sends
  it (`encode_ipc_handles`), opened in another process exactly as the worker extension does
  (`open_ipc_bucket`: vLLM's `PackedBufferImporter`, this GPU's UUID, the local device index), read in place:
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

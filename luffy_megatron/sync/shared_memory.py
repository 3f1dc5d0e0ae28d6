"""`shared_memory`: buckets are written once into memory the engine workers map; nothing is copied between
processes.

CPU (POSIX shared memory). Each stage's sender owns two /dev/shm files (`sync.shm_buffer.ShmBuffer`) as large as its
largest bucket, kept between syncs. Its TP peers map the same files (`_share_slots`, checked with a token) and
every TP rank writes its own shards straight into place (`fill_flat_bucket(shared=True)`; where a peer cannot
map them, the shards go to the sender over gloo and it writes them); the sender then asks every engine to load
the bucket (`luffy_load_flat_file`: each worker maps the file, once, and loads views of it; on CPU straight into
vLLM's kernel format, `rollout/direct_load.py`). While the engines load bucket k from one file, bucket k+1 is
exported into the other. Every engine must run on the sender's host (checked at the first sync, naming the
engine and both nodes). Copies of every byte: the export into shared memory (1), then the engine's load (on CPU
the packing of the linear layers reads the file in place: 1; embeddings and norms are copied into their
parameters).

GPU (CUDA IPC, as verl and NeMo-RL do it). A CUDA IPC handle opens only on the GPU the memory lives on, so here
every rank serves the engine worker on its own GPU (the colocated layout puts one on each): every rank builds every
bucket (each stage broadcasts its own buckets over the pipeline group: NVLink within a node), in one of two device
buffers (slots), in the full HF layout. When every engine worker runs the trainer's TP size and has the TP rank of
the trainer rank on its GPU (`ipc_serving_plan`), the tensors vLLM splits as megatron does (q/k/v, gate/up and their
biases, o_proj, down_proj) are not gathered: each rank writes its own shard of them into place and leaves the rest
of their bytes as they were, since vLLM's loader narrows every tensor to its TP rank's part
(`convert.export.engine_tp_slice`); the vocabulary and the replicated tensors are whole (the TP group exchanges the
vocabulary shards). Otherwise every tensor is whole, and why is logged once. The slots are made once per process and
GPU, at the plan's largest bucket (`convert.export.sync_slot_bytes`: the embedding's size when it is larger than the
bucket size), and their IPC handles (`torch.multiprocessing.reductions.reduce_tensor`) are exported once; later
syncs, and engines restarted since, reuse both (`ipc_slots`). Per bucket the first rank of each engine's GPUs sends
the handles of all of them (keyed by GPU UUID, as vLLM's `packed_ipc_consumer` expects) with the entry list; each
worker opens the one of its own GPU once per sync (`SlotImporter`) and loads from it in place, and releases its
mappings when the sync ends (`close_ipc_imports`, from `luffy_finish_weight_update`).
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import socket
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from luffy_megatron.convert.export import FlatBucket, export_flat_buckets, plan_flat_buckets, sync_slot_bytes
from luffy_megatron.sync.base import FilledAhead, SyncContext, Transport, finish_summary
from luffy_megatron.sync.shm_buffer import MappingCache, ShmBuffer

log = logging.getLogger(__name__)
ALIGN_PROBE = 4096  # the smallest bucket file (a stage with no tensors still probes its engines)


def encode_ipc_handles(by_uuid: dict) -> str:
    """{GPU UUID: `reduce_tensor` rebuild args} pickled into a string for the hop through vLLM's RPC encoder
    (as vLLM's own IPC engine does for HTTP)."""
    return base64.b64encode(pickle.dumps(by_uuid)).decode()


def gpu_uuid(device) -> str:
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def rebuild_ipc_tensor(args: list) -> torch.Tensor:
    """Consumer side: maps a sender's CUDA buffer from its `reduce_tensor` rebuild args."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor  # lazy: only engine workers map buffers

    return rebuild_cuda_tensor(*args)


class SlotImporter:
    """Consumer side of one slot (what vLLM's `PackedBufferImporter` does, without vLLM): the mapping of the
    sender's buffer, opened at the first bucket that names it and reused while the same handle comes: one open
    and one release per sync, not per bucket. `close()` releases it."""

    def __init__(self):
        self.entry: Optional[tuple] = None

    @property
    def held(self) -> bool:
        return self.entry is not None

    def rebuild(self, args: list) -> torch.Tensor:
        key = tuple(args)
        if self.entry is not None and self.entry[0] == key:
            return self.entry[1]
        self.entry = None  # another buffer: the old mapping goes first
        flat = rebuild_ipc_tensor(list(args))
        self.entry = (key, flat)
        return flat

    def close(self) -> None:
        self.entry = None


def open_ipc_bucket(handles_b64: str, slot: int, device, importers: dict) -> torch.Tensor:
    """Consumer side: the bucket buffer of `slot` from the handle of `device`'s GPU, mapped once per sync
    (`SlotImporter`); `importers` keeps one per slot until `close_ipc_imports`."""
    handles = pickle.loads(base64.b64decode(handles_b64))
    uuid = gpu_uuid(device)
    if uuid not in handles:
        raise ValueError(
            f"no CUDA IPC handle for this worker's GPU {uuid}; got {sorted(handles)}: the shared-memory "
            "transport needs a trainer rank on every engine GPU (cluster.layout=colocated)"
        )
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    args = list(handles[uuid])
    args[6] = index  # the device index as this process numbers it (vLLM's packed_ipc_consumer does the same)
    return importers.setdefault(slot, SlotImporter()).rebuild(args)


def close_ipc_imports(importers: Optional[dict]) -> int:
    """Consumer side, when a sync ends: releases every slot mapping (the sender's memory is then mapped by no
    engine between syncs). Returns how many were held."""
    if not importers:
        return 0
    held = sum(1 for imp in importers.values() if imp.held)
    for imp in importers.values():
        imp.close()
    importers.clear()
    return held


# ---------------------------------------------------------------- the sender's two slots


class SlotPair:
    """A sender's two bucket buffers (bucket k goes into slot k % 2), made once at a plan's slot size and kept
    for every later sync; both are made anew only when a plan needs more. `make(nbytes, i)` builds slot i,
    `share(buf)` what another process needs to map it (computed once per buffer, so the consumers see the same
    handle every sync), `collect()` runs after buffers were let go. One piece of logic for both paths: /dev/shm
    files on CPU (`ShmBuffer`), CUDA memory with IPC handles on GPU (`ipc_slots`)."""

    def __init__(
        self,
        make: Callable,
        share: Optional[Callable] = None,
        free: Optional[Callable] = None,
        collect: Optional[Callable] = None,
    ):
        self.make, self.share_of = make, share or (lambda buf: None)
        self.free, self.collect = free or (lambda buf: None), collect or (lambda: None)
        self.bufs: list = [None, None]
        self.shared: list = [None, None]
        self.nbytes = 0
        self.made = 0  # how many pairs were made

    def __getitem__(self, i: int):
        return self.bufs[i]

    @property
    def held_bytes(self) -> int:
        return self.nbytes * sum(b is not None for b in self.bufs)

    def ensure(self, nbytes: int, before_free: Callable[[int], None] = lambda i: None) -> bool:
        """Both slots hold at least `nbytes` (made now if not; `before_free(i)` runs before slot i is let go).
        Returns True when they were made now."""
        nbytes = max(int(nbytes), 1)
        if all(b is not None for b in self.bufs) and self.nbytes >= nbytes:
            return False
        self.close(before_free)
        for i in range(2):
            buf = self.make(nbytes, i)
            self.bufs[i], self.shared[i] = buf, self.share_of(buf)
        self.nbytes = nbytes
        self.made += 1
        return True

    def close(self, before_free: Callable[[int], None] = lambda i: None) -> int:
        """Lets both slots go; returns the bytes they held."""
        held = self.held_bytes
        for i in range(2):
            if self.bufs[i] is not None:
                before_free(i)
                self.free(self.bufs[i])
                self.bufs[i] = self.shared[i] = None
        self.nbytes = 0
        if held:
            self.collect()
        return held


def new_ipc_slot(nbytes: int, device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def export_ipc_slot(buf: torch.Tensor) -> tuple:
    """The `reduce_tensor` rebuild args of a slot: called once per slot (a CUDA IPC handle, an event and one
    refcount slot in torch's table per call)."""
    return reduce_tensor(buf)[1]


def collect_ipc() -> None:
    """Frees the CUDA blocks other processes no longer map (`torch.cuda.ipc_collect`)."""
    if torch.cuda.is_initialized():
        torch.cuda.ipc_collect()


_IPC_SLOTS: dict = {}  # CUDA device index -> SlotPair: this process's IPC slots


def ipc_slots(device) -> SlotPair:
    """This process's CUDA IPC slots on `device`, kept for the process's life (not per transport): a restarted
    engine gets a new transport and maps the same slots again, so slots that a killed engine still counted as
    mapped are never freed into torch's IPC limbo, where nothing would reclaim them. torch counts one release
    per export (`CudaIPCSentDataDelete` keeps a freed block in its limbo while the count is above zero); the
    engines open and release each slot once per sync, so once a sync has ended the count is not above zero and
    a slot let go is freed at once. They are let go only between syncs (`release_ipc_slots`, or a plan that
    needs larger ones), when no engine maps them."""
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    if index not in _IPC_SLOTS:
        _IPC_SLOTS[index] = SlotPair(
            make=lambda nbytes, i: new_ipc_slot(nbytes, torch.device("cuda", index)),
            share=lambda buf: export_ipc_slot(buf),
            collect=lambda: collect_ipc(),
        )
    return _IPC_SLOTS[index]


def ipc_slot_bytes() -> int:
    """Bytes of GPU memory this process holds in weight-sync slots (0 on CPU and before the first GPU sync):
    2 x `sync_slot_bytes` of the plan from the first GPU sync on, in every phase until `release_ipc_slots`."""
    return sum(pair.held_bytes for pair in _IPC_SLOTS.values())


def release_ipc_slots() -> int:
    """Frees this process's weight-sync slots (between syncs only); the next GPU sync makes and exports new ones.
    Returns the bytes freed."""
    return sum(pair.close() for pair in _IPC_SLOTS.values())


_LOGGED: set = set()  # reasons for full tensors already logged by this process


def ipc_serving_plan(workers: list, ranks: list) -> tuple:
    """Rank 0's plan of the CUDA IPC sync from every engine's `luffy_worker_info` list (`workers`) and every
    trainer rank's (GPU UUID, megatron TP rank, TP size) (`ranks`). Returns (serving, own_shards, why): serving
    lists per engine the ranks on its workers' GPUs (the first rank on a GPU serves it); `own_shards` says every
    rank may fill its slots with only its own TP shards of the tensors vLLM splits as megatron does
    (`convert.export.engine_owns_shards`), which holds when every engine worker runs the trainer's TP size and
    has the TP rank of the trainer rank on its GPU (vLLM's loader of TP rank r then keeps exactly what TP rank r
    wrote); `why` says why not ("" when TP is 1: there is nothing to gather). Where a worker's GPU has no
    trainer rank, serving is the error message instead."""
    tp = int(ranks[0][2]) if ranks else 1
    serving, why = [], ""
    for i, infos in enumerate(workers):
        engine = []
        for w in infos:
            owners = [r for r, info in enumerate(ranks) if info[0] == w["gpu_uuid"]]
            if not owners:
                error = (
                    f"rollout.weight_sync_transport=shared_memory on GPUs: worker {w['rank']} of engine {i} "
                    f"is on GPU {w['gpu_uuid']}, which no Megatron rank uses. CUDA IPC reaches only "
                    "engines on the trainer's GPUs (cluster.layout=colocated); use collective"
                )
                return error, False, ""
            owner = owners[0]
            engine.append(owner)
            if why or tp <= 1:
                continue
            if w.get("tp_size") is None or w.get("tp_rank") is None:
                why = f"worker {w['rank']} of engine {i} reports no TP rank"
            elif int(w["tp_size"]) != tp:
                why = f"engine {i} runs TP {w['tp_size']}, the trainer TP {tp}"
            elif int(w["tp_rank"]) != int(ranks[owner][1]):
                why = (
                    f"worker {w['rank']} of engine {i} (TP rank {w['tp_rank']}) is on the GPU of trainer rank "
                    f"{owner} (TP rank {ranks[owner][1]})"
                )
        serving.append(sorted(set(engine)))
    return serving, tp > 1 and not why, why


def ray_node_id() -> Optional[str]:
    try:
        import ray  # lazy: outside Ray there may be none

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


class SharedMemoryTransport(Transport):
    name = "shared_memory"

    def __init__(self, fleet):
        super().__init__(fleet)
        self.slots = SlotPair(  # CPU: two /dev/shm files (the GPU path uses `ipc_slots`)
            make=lambda nbytes, i: ShmBuffer(nbytes, tag=f"stage{self._ctx.pp_rank}-slot{i}"),
            free=lambda buf: buf.close(),
        )
        self.pending: list[list] = [[], []]  # engine loads still reading each slot
        self.k = 0
        self._ctx: Optional[SyncContext] = None
        self._unreachable: Optional[list[int]] = None
        self._ipc: Optional[dict] = None
        self.slots_made = 0  # random id of the sender's current bucket files (new files: its TP peers map them again)
        self._shared: Optional[tuple] = None  # (slots_made, _share_slots' result) of the last exchange
        self._peer_maps = None  # contributor: its mappings of the sender's files

    def close(self) -> None:
        self.slots.close()

    # ---------------------------------------------------------------- CPU: /dev/shm

    def run(self, ctx: SyncContext) -> dict:
        if ctx.device.type == "cuda":
            return self._run_ipc(ctx)
        self._ctx = ctx
        if ctx.role == "idle":
            return {}
        contributor_slots = self._share_slots(ctx)
        if contributor_slots is None:
            return super().run(ctx)
        if ctx.role == "contributor":  # writes its shards straight into the sender's bucket files
            count = iter(range(1 << 62))
            for _ in ctx.fill(lambda bucket: contributor_slots[next(count) % 2], shared=True):
                pass
            return {}
        filling = ctx.fill(self.buffer_for, shared=True)
        try:
            return self.send(ctx, filling)
        finally:
            ctx.drain(filling)

    def _share_slots(self, ctx: SyncContext) -> Optional[list]:
        """CPU, TP > 1: the sender hands its TP peers the paths of its two bucket files; when every peer can map
        them (the same host), each TP rank writes its own shards into the files itself (one copy per byte, no
        socket hop through the sender). Collective over the stage's TP group; returns on a contributor its
        mappings of the two files, on the sender [], and None everywhere when the files are not shared. The
        exchange runs again only when the sender made new files (`slots_made`) or a peer has none mapped; other
        syncs cost one all-gather of one number per rank."""
        from megatron.core import parallel_state as ps  # lazy: the driver imports this module, never megatron

        if ps.get_tensor_model_parallel_world_size() == 1:
            return None
        group = ps.get_tensor_model_parallel_group()
        root = dist.get_process_group_ranks(group)[0]
        cached = self._shared
        if ctx.is_sender:
            self._ensure_slots(max((b.nbytes for b in ctx.buckets), default=ALIGN_PROBE))
        # one collective: the file id each rank exchanged last (-1: none; the sender: -2 if it made new files since)
        have = cached[0] if cached is not None else -1
        if ctx.is_sender and have != self.slots_made:
            have = -2
        ids = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(ids, torch.tensor([have], dtype=torch.int64), group=group)
        made = int(ids[dist.get_group_rank(group, root)][0])
        if made > 0 and all(int(i[0]) == made for i in ids):
            return cached[1]
        spec = [None]
        if ctx.is_sender:  # no engine reads the files between syncs: a token in the first one proves the mapping
            token = list(os.urandom(16))
            self.slots[0].tensor[:16] = torch.tensor(token, dtype=torch.uint8)
            spec = [([(s.path, s.nbytes) for s in self.slots.bufs], token, self.slots_made)]
        dist.broadcast_object_list(spec, src=root, group=group)
        files, token, made = spec[0]
        mapped = None
        if not ctx.is_sender:
            if all(os.path.exists(path) for path, _ in files):
                if self._peer_maps is None:
                    self._peer_maps = MappingCache(size=2)
                mapped = [self._peer_maps.get(path, nbytes) for path, nbytes in files]
                if mapped[0][:16].tolist() != token:  # a file of the same name on another host
                    mapped = None
        ok: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(ok, ctx.is_sender or mapped is not None, group=group)
        if not all(ok):
            log.warning(
                "weight sync: TP rank(s) %s of stage %d cannot map the sender's bucket files; their shards "
                "go through the sender",
                [i for i, good in enumerate(ok) if not good],
                ctx.pp_rank,
            )
        result = ([] if ctx.is_sender else mapped) if all(ok) else None
        self._shared = (int(made), result)
        return result

    def reachable(self, ctx: SyncContext) -> list[int]:
        """Senders, on CPU: the engines that cannot map this sender's bucket files (a token written into a file
        is read back by every engine worker: the same /dev/shm, whatever Ray calls the node). Cached per fleet."""
        if self._unreachable is not None:
            return self._unreachable
        self._ctx = ctx
        self._ensure_slots(max((b.nbytes for b in ctx.buckets), default=ALIGN_PROBE))
        token = list(os.urandom(16))
        self.slots[0].tensor[:16] = torch.tensor(token, dtype=torch.uint8)
        heads = ctx.engine_get(
            [
                e.call.remote("worker_rpc", "luffy_read_shm", self.slots[0].path, self.slots[0].nbytes, 16)
                for e in self.fleet.engines
            ],
            "luffy_read_shm",
        )
        self._unreachable = [i for i, workers in enumerate(heads) if any(h != token for h in workers)]
        return self._unreachable

    def unreachable_message(self, ctx: SyncContext, engines: list[int]) -> str:
        infos = ctx.engine_get([self.fleet.engines[i].placement_info.remote() for i in engines], "placement_info")
        where = ", ".join(
            f"engine {i} on {info.get('node_ip')} ({info.get('hostname')})" for i, info in zip(engines, infos)
        )
        return (
            f"rollout.weight_sync_transport=shared_memory: {where} cannot map the bucket files of the sender of "
            f"pipeline stage {ctx.pp_rank} (rank {ctx.rank} on {socket.gethostname()}, Ray node "
            f"{str(ray_node_id())[:8]}): "
            "shared memory reaches only engines on the sender's host. Use rollout.weight_sync_transport=collective "
            "(or auto)"
        )

    def _ensure_slots(self, nbytes: int) -> None:
        if self.slots.ensure(nbytes, before_free=self._wait):  # engines still reading a slot finish first
            self.slots_made = int.from_bytes(os.urandom(7), "little") + 1

    def _wait(self, slot: int) -> None:
        if self.pending[slot]:
            refs, self.pending[slot] = self.pending[slot], []
            self._ctx.engine_get(refs, "luffy_load_flat_file")

    def buffer_for(self, bucket: FlatBucket) -> torch.Tensor:
        slot = self.k % 2
        self._wait(slot)  # the engines are done with the bucket two back
        return self.slots[slot].tensor

    def ahead(self, ctx: SyncContext, filling: Iterator) -> Iterator:
        """The first bucket is exported into slot 0 while the engines open their session."""
        if ctx.buckets:
            self._ensure_slots(max(b.nbytes for b in ctx.buckets))
        self.k = 0
        try:  # the first sync's probe writes a token into slot 0: before the bucket goes there
            unreachable = self.reachable(ctx)
        except Exception:  # noqa: BLE001 - `transfer` asks again and fails inside the senders' agreement
            return filling
        return filling if unreachable else FilledAhead(filling)

    def transfer(self, ctx: SyncContext, filling: Iterator) -> None:
        if self.reachable(ctx):
            raise RuntimeError(self.unreachable_message(ctx, self._unreachable))
        try:
            for bucket, buf in filling:
                slot = self.k % 2
                shm = self.slots[slot]
                entries = bucket.wire_entries()
                self.pending[slot] = [
                    e.call.remote("load_weights_rpc", "luffy_load_flat_file", entries, shm.path, shm.nbytes, entries)
                    for e in self.fleet.engines
                ]
                self.k += 1
        finally:
            for slot in range(2):
                self._wait(slot)

    # ---------------------------------------------------------------- GPU: CUDA IPC

    def _ipc_setup(self, ctx: SyncContext) -> dict:
        """Once per fleet: which rank serves which engine worker (same GPU UUID), one process group per engine of
        the ranks that serve it (their first rank talks to the engine), and whether each rank fills its slots with
        its own TP shards only (`ipc_serving_plan`; the reason it does not is logged once)."""
        if self._ipc is not None:
            return self._ipc
        uuid = gpu_uuid(ctx.device)
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (uuid, int(ctx.tp_rank), int(ctx.tp_size)))
        plan = [None]
        if dist.get_rank() == 0:
            workers = ctx.engine_get(
                [e.call.remote("worker_rpc", "luffy_worker_info") for e in self.fleet.engines], "luffy_worker_info"
            )
            plan[0] = ipc_serving_plan(workers, ranks)
        dist.broadcast_object_list(plan, src=0)
        serving, own_shards, why = plan[0]
        if isinstance(serving, str):
            raise RuntimeError(serving)
        if why and dist.get_rank() == 0 and why not in _LOGGED:
            _LOGGED.add(why)
            log.warning("weight sync (CUDA IPC): every rank builds full tensors: %s", why)
        groups = [dist.new_group(ranks) for ranks in serving]  # every rank, in the same order
        me = dist.get_rank()
        mine = [i for i, ranks in enumerate(serving) if me in ranks]
        self._ipc = {
            "serving": serving,
            "groups": groups,
            "engine": mine[0] if mine else None,
            "uuid": uuid,
            "own_shards": own_shards,
        }
        return self._ipc

    def _run_ipc(self, ctx: SyncContext) -> dict:
        ipc = self._ipc_setup(ctx)
        buckets = plan_flat_buckets(
            ctx.chunks, ctx.arch, bucket_bytes=ctx.bucket_bytes, dtype=ctx.dtype, all_stages=True
        )
        slots = ipc_slots(ctx.device)
        slots.ensure(sync_slot_bytes(buckets))  # every rank plans every stage: the same size on all of them
        handles = self._ipc_handles(ipc, slots)
        self._ipc_open(ctx)
        err = self._ipc_send(ctx, ipc, buckets, slots, handles)
        try:
            self._world_agree(err is None, "sending weights")
        except RuntimeError:
            self.abort(ctx) if ctx.rank == 0 else None
            raise err if err is not None else RuntimeError("weight sync (CUDA IPC) failed on another rank")
        result = {}
        if ctx.rank == 0:  # the engines release their mappings of the slots as they close the session
            result = finish_summary(
                ctx.engine_get([x.finish_weight_update.remote() for x in self.fleet.engines], "finish_weight_update")
            )
        collect_ipc()
        return result

    def _ipc_handles(self, ipc: dict, slots: SlotPair) -> list[str]:
        """Per slot, the handles of every GPU of this rank's engine (its group gathers them: small objects,
        exported once per slot and the same every sync while the slots are)."""
        e = ipc["engine"]
        if e is None:
            return ["", ""]
        by_uuid: list = [None] * len(ipc["serving"][e])
        dist.all_gather_object(by_uuid, (ipc["uuid"], list(slots.shared)), group=ipc["groups"][e])
        return [encode_ipc_handles({u: h[i] for u, h in by_uuid}) for i in range(2)]

    def _world_agree(self, ok: bool, what: str) -> None:
        oks: list = [None] * dist.get_world_size()
        dist.all_gather_object(oks, ok)
        if not all(oks):
            raise RuntimeError(
                f"weight sync (CUDA IPC): {what} failed on rank(s) {[r for r, o in enumerate(oks) if not o]}"
            )

    def _ipc_open(self, ctx: SyncContext) -> None:
        """Rank 0 opens the engines' update session; every rank learns whether it did."""
        err = None
        try:
            if ctx.rank == 0:
                ctx.engine_get([x.begin_weight_update.remote() for x in self.fleet.engines], "begin_weight_update")
        except BaseException as exc:  # noqa: BLE001 - re-raised once every rank knows
            err = exc
        try:
            self._world_agree(err is None, "opening the engines' update session")
        except RuntimeError:
            raise err if err is not None else RuntimeError("weight sync (CUDA IPC): rank 0 could not open the session")

    def _ipc_send(
        self, ctx: SyncContext, ipc: dict, buckets: list, slots: SlotPair, handles: list
    ) -> Optional[BaseException]:
        """Every bucket into slot k % 2; the leader of each engine's ranks has its engine load it. Returns this
        rank's error (None when all went well): every rank takes part to the end, so none waits for another."""
        e = ipc["engine"]
        group = ipc["groups"][e] if e is not None else None
        leader = e is not None and dist.get_rank() == ipc["serving"][e][0]
        own = bool(ipc.get("own_shards"))
        err: Optional[BaseException] = None

        def settle(pending) -> None:
            """Bucket k-1 is loaded (the leader waits for its engine), then its engine group moves on together."""
            nonlocal err
            if pending is not True and err is None:
                try:
                    ctx.engine_get(pending, "luffy_load_ipc")
                except BaseException as exc:  # noqa: BLE001 - the leader keeps taking part, sending nothing
                    err = exc
            dist.barrier(group=group)

        pending, k = None, 0
        try:
            for bucket, buf in export_flat_buckets(
                buckets, ctx.arch, lambda b: slots[k % 2], everywhere=True, stats=ctx.stats, own_shards=own
            ):
                if buf.is_cuda:  # the bucket is complete before a worker reads it
                    torch.cuda.current_stream(buf.device).synchronize()
                if pending is not None:  # the engine finished bucket k-1: its slot is free for bucket k+1
                    settle(pending)
                    pending = None
                if leader and err is None:
                    entries = bucket.wire_entries()
                    pending = self.fleet.engines[e].call.remote(
                        "load_weights_rpc", "luffy_load_ipc", entries, handles[k % 2], k % 2, entries
                    )
                elif group is not None:
                    pending = True  # the same barriers as the leader
                k += 1
            if pending is not None:
                settle(pending)
        except BaseException as exc:  # noqa: BLE001
            err = exc
        return err

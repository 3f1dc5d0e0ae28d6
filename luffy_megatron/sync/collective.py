"""`collective`: a dedicated process group per sender with every engine worker; buckets are broadcast.

Groups. Each pipeline stage's sender is rank 0 of its own group whose other members are every worker of every
engine (engine e's worker w is rank 1 + sum of the workers of engines before e + w). Created once per fleet at
the first sync, through vLLM's helpers for exactly this (as vLLM's RLHF examples and its "nccl" weight-transfer
engine do): on CPU a gloo `ProcessGroup` from `vllm.distributed.utils.stateless_init_torch_distributed_process_group`
(which does not touch torch.distributed's global state of either side), on GPU a `StatelessProcessGroup` with a
`PyNcclCommunicator` (`vllm.distributed.weight_transfer.nccl_common.stateless_init_process_group`). The workers
join in the worker extension (`luffy_join_weight_groups`), all groups in stage order, so no two engines wait on
each other in different orders.

A sync. The senders share their bucket plans (sizes and (name, dtype, shape, offset) lists) and the driver
starts one receive call per engine (`luffy_receive_collective`) holding all of them; each worker then receives
bucket after bucket in one fixed order, round robin over the stages (every member of every group sees its
group's broadcasts in the same order, so the groups cannot deadlock), into two receive buffers: bucket k+1
arrives while bucket k loads. Each sender broadcasts its buckets from two buffers, exporting bucket k+1 while
bucket k is on the wire. Copies of every byte: the export into the send buffer (1), the transfer into each
worker's receive buffer (2; through the kernel's socket buffers on gloo, by DMA on NCCL), vLLM's load (3).

A member that dies or hangs. Every wait ends within `rollout.request_timeout_s`: gloo's group times out itself
(and fails at once when a peer's connection closes); an NCCL broadcast is polled against that deadline and its
communicator aborted past it (`WeightGroup`, `wait_bounded`). Either way the broadcast raises, the sender closes
its group, and the next sync builds new groups with every engine worker (`_needs_setup`).
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from luffy_megatron.convert.export import FlatBucket
from luffy_megatron.sync.base import SyncContext, Transport, node_ip

log = logging.getLogger(__name__)


class WeightGroup:
    """One sender <-> engine-workers group: broadcasts a uint8 buffer from the sender (group rank 0).

    No wait is unbounded. gloo's process group carries `timeout_s` itself. NCCL (vLLM's `PyNcclCommunicator`) has
    no timeout: a broadcast whose peer died or hangs never completes, and a thread waiting on it (the rank actor's)
    would be stuck for good. Its wait polls the broadcast's CUDA event for at most `timeout_s`
    (`rollout.request_timeout_s`), then aborts the communicator (`abort`, ncclCommAbort) and raises; the caller
    closes the group and the next sync builds a new one, as after a failed gloo broadcast."""

    def __init__(self, backend: str, pg=None, comm=None, device=None, timeout_s: float = 1800.0, name: str = ""):
        self.backend, self.pg, self.comm, self.device = backend, pg, comm, device
        self.timeout_s, self.name = float(timeout_s), name or f"{backend} weight group"
        self.stream = None  # NCCL: the side stream broadcasts run on, made at the first
        self.aborts = 0

    @classmethod
    def create(
        cls,
        *,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        listen_socket: Optional[socket.socket] = None,
        device=None,
        name: str = "",
    ) -> "WeightGroup":
        name = f"weight group {name or f'{host}:{port}'} ({backend})"
        if backend == "gloo":
            # lazy: vLLM only where a group is made (the engine workers, the senders)
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            pg = stateless_init_torch_distributed_process_group(
                host, port, rank, world_size, "gloo", listen_socket=listen_socket, timeout=timedelta(seconds=timeout_s)
            )
            return cls("gloo", pg=pg, timeout_s=timeout_s, name=name)
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group  # lazy: as above

            if listen_socket is not None:
                listen_socket.close()  # vLLM's rendezvous binds the port itself on group rank 0
            comm = stateless_init_process_group(host, port, rank, world_size, device)
            return cls("nccl", comm=comm, device=device, timeout_s=timeout_s, name=name)
        raise ValueError(f"unknown weight-group backend {backend!r}")

    def broadcast(self, tensor: torch.Tensor, root: int = 0):
        """Starts the broadcast; returns something with `wait()`."""
        if self.backend == "gloo":
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = root, 0
            return self.pg.broadcast([tensor], opts)
        if self.comm is None:
            raise RuntimeError(f"weight sync: the {self.name} was aborted or closed; the next sync builds a new one")
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            self.comm.broadcast(tensor, src=root, stream=self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        tensor.record_stream(self.stream)
        return EventWait(event, self)

    def abort(self) -> None:
        """Ends what this group's broadcasts still wait for (a member died or hangs): vLLM 0.32's
        `PyNcclCommunicator.destroy` calls `ncclCommAbort` (not the collective `ncclCommDestroy`) from a thread
        it waits at most 5 s for. The group cannot be used again."""
        comm, self.comm = self.comm, None
        if comm is None:
            return
        self.aborts += 1
        log.warning("weight sync: aborting the %s (a broadcast failed or ran past %gs)", self.name, self.timeout_s)
        try:
            comm.destroy()
        except Exception as err:  # noqa: BLE001 - already failing
            log.warning("aborting the %s: %s", self.name, err)

    def close(self) -> None:
        try:
            if self.pg is not None:
                self.pg.shutdown()
            if self.comm is not None:
                self.comm.destroy()  # vLLM 0.32: an abort (see `abort`), safe with members gone
        except Exception as err:  # noqa: BLE001 - the other side may be gone
            log.debug("closing a weight group: %s", err)
        self.pg = self.comm = None


def wait_bounded(
    done: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    on_expiry: Callable[[], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Polls `done()` until it returns True. After `timeout_s` (or when `done()` raises, e.g. a CUDA error on the
    stream) calls `on_expiry()` once and raises: a TimeoutError naming `what` and the setting that bounds it.
    The poll interval doubles from 20 us up to 1 ms: at most 1 ms late per bucket, and no core spun."""
    deadline = clock() + float(timeout_s)
    pause = 2e-5
    while True:
        try:
            if done():
                return
        except BaseException:
            on_expiry()
            raise
        if clock() >= deadline:
            on_expiry()
            raise TimeoutError(
                f"weight sync: a broadcast of the {what} did not finish within {timeout_s:g}s "
                "(rollout.request_timeout_s): an engine worker in it died or hangs. The communicator was aborted and "
                "the next sync builds a new one; raise rollout.request_timeout_s if the broadcast is only slow"
            )
        sleep(pause)
        pause = min(pause * 2, 1e-3)


class EventWait:
    """An NCCL broadcast in flight: `wait()` polls its CUDA event, bounded by the group's timeout."""

    def __init__(self, event, group: WeightGroup):
        self.event, self.group = event, group

    def wait(self) -> None:
        wait_bounded(self.event.query, timeout_s=self.group.timeout_s, what=self.group.name, on_expiry=self.group.abort)


def _listen(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen()
    return s


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(self, fleet):
        super().__init__(fleet)
        self.group: Optional[WeightGroup] = None
        self.group_names: list[str] = []
        self.slots: list = [None, None]
        self.inflight: list = [None, None]  # the broadcast reading each slot
        self.k = 0

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def _setup(self, ctx: SyncContext) -> None:
        """Once per fleet (collective over the senders): every sender's group with every engine worker."""
        if not self._needs_setup(ctx):
            return
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        host = node_ip()
        sock = _listen(host)
        port = sock.getsockname()[1]
        spec = {
            "name": f"luffy-weights-stage{ctx.sender_index}-{host}:{port}",
            "host": host,
            "port": port,
            "backend": backend,
            "timeout_s": ctx.timeout_s,
        }
        workers = None
        if ctx.is_driver:
            workers = [
                len(w)
                for w in ctx.engine_get(
                    [e.call.remote("worker_rpc", "luffy_worker_info") for e in self.fleet.engines], "luffy_worker_info"
                )
            ]
        gathered = ctx.all_gather((spec, workers))
        workers = gathered[0][1]
        world = 1 + sum(workers)
        groups = [dict(g, world_size=world) for g, _ in gathered]
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        joins = None
        if ctx.is_driver:
            joins = [
                e.call.remote("worker_rpc", "luffy_join_weight_groups", groups, offsets[i])
                for i, e in enumerate(self.fleet.engines)
            ]
        try:
            self.group = WeightGroup.create(
                host=host,
                port=port,
                rank=0,
                world_size=world,
                backend=backend,
                timeout_s=ctx.timeout_s,
                listen_socket=sock,
                device=ctx.device if backend == "nccl" else None,
                name=spec["name"],
            )
        finally:
            if backend == "gloo":
                sock.close()  # the store took its own handle of the socket
        if joins is not None:
            ctx.engine_get(joins, "luffy_join_weight_groups")
        self.group_names = [g["name"] for g in groups]
        log.info("weight sync: %d collective group(s) of %d (%s)", len(groups), world, backend)

    def _needs_setup(self, ctx: SyncContext) -> bool:
        """All senders build their groups together (the set-up is collective over them): when any sender lacks
        its group (the first sync, or a failed broadcast closed it), every sender closes its own and all build
        anew, the engine workers rejoining them all."""
        missing = ctx.all_gather(self.group is None)
        if not any(missing):
            return False
        self.close()
        return True

    def buffer_for(self, bucket: FlatBucket) -> torch.Tensor:
        slot = self.k % 2
        if self.inflight[slot] is not None:  # the broadcast of the bucket two back
            self.inflight[slot].wait()
            self.inflight[slot] = None
        return self.slots[slot]

    def transfer(self, ctx: SyncContext, filling: Iterator) -> None:
        plans = ctx.all_gather([[b.nbytes, b.wire_entries()] for b in ctx.buckets])
        receives = None
        if ctx.is_driver:
            names = [e for plan in plans for _, entries in plan for e in entries]
            receives = [
                e.call.remote("load_weights_rpc", "luffy_receive_collective", names, self.group_names, plans)
                for e in self.fleet.engines
            ]
        size = max((b.nbytes for b in ctx.buckets), default=0)
        for i in range(2):
            if size and (self.slots[i] is None or self.slots[i].numel() < size):
                self.slots[i] = torch.empty(size, dtype=torch.uint8, device=ctx.device)
        self.k = 0
        try:
            for bucket, buf in filling:
                self.inflight[self.k % 2] = self.group.broadcast(buf[: bucket.nbytes])
                self.k += 1
            for slot in range(2):
                if self.inflight[slot] is not None:
                    self.inflight[slot].wait()
                    self.inflight[slot] = None
        except BaseException:
            # A member died (gloo fails this sender's broadcast at once; NCCL's wait runs out and aborts the
            # communicator) or this sender failed: the group has a dead member, so the next sync builds new ones
            # (`_needs_setup`). Closing it also ends the other workers' wait for this group's next broadcast, but
            # not always (measured on gloo: `shutdown()` does not always close the connections; such a worker
            # waits out rollout.request_timeout_s).
            self.inflight = [None, None]
            self.close()
            raise
        if receives is not None:
            ctx.engine_get(receives, "luffy_receive_collective")

    def run(self, ctx: SyncContext) -> dict:
        if ctx.is_sender:
            self._setup(ctx)
        return super().run(ctx)


# ------------------------------------------------------------------------------- engine side (worker extension)


def worker_join(worker, groups: list[dict], rank_offset: int) -> list[str]:
    """In a vLLM worker: joins every sender's group (in the given order) as rank `rank_offset + worker rank`."""
    joined = getattr(worker, "_luffy_weight_groups", {})
    for g in joined.values():
        g.close()
    joined = {}
    rank = int(rank_offset) + int(getattr(worker, "rank", 0))
    device = worker.device if g_backend_is_nccl(groups) else None
    for g in groups:
        joined[g["name"]] = WeightGroup.create(
            host=g["host"],
            port=int(g["port"]),
            rank=rank,
            world_size=int(g["world_size"]),
            backend=g["backend"],
            timeout_s=float(g["timeout_s"]),
            device=device,
            name=g["name"],
        )
    worker._luffy_weight_groups = joined
    return list(joined)


def g_backend_is_nccl(groups: list[dict]) -> bool:
    return any(g["backend"] == "nccl" for g in groups)


def worker_receive(worker, group_names: list[str], plans: list, load) -> int:
    """In a vLLM worker: receives every sender's buckets (round robin over senders, each sender's in order) into
    two buffers, and `load(buffer, entries)` each while the next one arrives. Returns the number of tensors."""
    groups = [worker._luffy_weight_groups[n] for n in group_names]
    order = []
    longest = max((len(p) for p in plans), default=0)
    for k in range(longest):
        for s, plan in enumerate(plans):
            if k < len(plan):
                order.append((s, int(plan[k][0]), plan[k][1]))
    if not order:
        return 0
    size = max(n for _, n, _ in order)
    bufs = getattr(worker, "_luffy_recv_buffers", None)
    if bufs is None or bufs[0].numel() < size or bufs[0].device != worker.device:
        bufs = [torch.empty(size, dtype=torch.uint8, device=worker.device) for _ in range(2)]
        worker._luffy_recv_buffers = bufs
    count = 0
    pending = groups[order[0][0]].broadcast(bufs[0][: order[0][1]])
    for i, (s, nbytes, entries) in enumerate(order):
        pending.wait()
        if i + 1 < len(order):
            ns, nn, _ = order[i + 1]
            pending = groups[ns].broadcast(bufs[(i + 1) % 2][:nn])  # arrives while this one loads
        count += load(bufs[i % 2], entries)
    return count

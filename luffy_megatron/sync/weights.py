"""Weight sync: Megatron shards (any TP x PP) -> HF-named flat buckets -> rollout engines, over a transport.

Every Megatron rank calls `sync_actor_to_engines` at the same time. Who does what:

* senders: TP rank 0 of DP (and CP) replica 0 on every pipeline stage. Each exports the buckets of its own
  stage's layers (`convert.export.plan_flat_buckets(all_stages=False)`; its TP peers send their shards straight
  into its bucket buffer) and hands them to the transport itself: nothing funnels through one rank, and
  engines receive from every stage's sender.
* contributors: the other TP ranks of those stages (they only send shards into the senders' buckets).
* the driver, global rank 0 (the sender of stage 0), also drives the engines' update session: it opens it
  before any bytes move, and closes it (`finish_weight_update`: prefix cache reset, version bump, check that
  every tensor arrived) once every sender has finished.
* everyone else (other DP / CP replicas) has nothing to do.

Transports (`rollout.weight_sync_transport`, one module each; see `resolve_transport` for `auto`):

* `collective` (`sync/collective.py`): one process group per sender with every engine worker (gloo on CPU,
  NCCL on GPU, created through vLLM's `StatelessProcessGroup` / `PyNcclCommunicator`); a bucket is broadcast as
  one flat buffer, its (name, dtype, shape, offset) list goes ahead through Ray. For engines on other nodes.
* `shared_memory` (`sync/shared_memory.py`): the sender fills its bucket in shared memory (a /dev/shm file on
  CPU, CUDA IPC on GPU) and the engine workers load from a mapping of it: no copy between processes.
* `object_store` (`sync/object_store.py`): each bucket goes through Ray's object store; works everywhere.

Every transport double-buffers: the export of bucket k+1 runs while bucket k travels or loads.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from luffy_megatron.convert.export import DEFAULT_BUCKET_BYTES, ExportStats, FlatBucket

log = logging.getLogger(__name__)

Bucket = list  # list[tuple[str, torch.Tensor]]
TRANSPORTS = ("collective", "shared_memory", "object_store")
DEFAULT_TIMEOUT_S = 1800.0


def resolve_transport(setting: str, layout_mode: str) -> str:
    """`rollout.weight_sync_transport` with `auto` decided by the cluster layout (`cluster.layout` resolved):
    colocated engines share their node (and GPU) with the ranks that send -> `shared_memory`; disaggregated
    engines sit on other nodes -> `collective`; the CPU layout (Ray actors without GPUs, possibly spread over
    several Ray nodes) -> `object_store`, the path that needs no shared host and no process group.

    On GPUs, colocated `shared_memory` means CUDA IPC (every rank serves the engine worker on its own GPU). Without
    CUDA (CPU, or fake GPUs) it is /dev/shm, which the trainer runs with `fallback="collective"` under `auto`: where
    a sender's files are not visible to every engine (another host), the sync takes the collective path."""
    if setting != "auto":
        if setting not in TRANSPORTS:
            raise ValueError(f"rollout.weight_sync_transport={setting!r} is not one of auto, {', '.join(TRANSPORTS)}")
        return setting
    return {"colocated": "shared_memory", "disaggregated": "collective"}.get(layout_mode, "object_store")


@dataclass
class SyncStats:
    bytes: int = 0  # bytes of HF tensors this rank sent (its stage's; on the driver: all stages')
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    sent: bool = False  # True on ranks that handed buckets to the transport
    weight_version: Optional[int] = None  # the engines' version after the update (driver only)
    transport: str = ""
    role: str = ""  # driver | sender | contributor | idle
    stage: int = 0  # pipeline stage of this rank
    senders: list = field(default_factory=list)  # driver: per sender {rank, stage, bytes, buckets, tensors}
    engine_load: str = ""  # how the engines loaded (driver): direct | layerwise (rollout/direct_load.py)
    fill: str = ""  # gather: TP shards sent to TP rank 0 | shared: each TP rank wrote its own into shared memory
    engine_packed_from_copy: int = 0  # direct loads: linear layers packed from a copy, not the bucket in place

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- the legacy bucket stream


def object_store_transport(fleet, buckets: Iterable[Bucket]) -> dict:
    """Lists of named tensors through the Ray object store (`EngineFleet.update_weights_from_buckets`)."""
    return fleet.update_weights_from_buckets(buckets)


def closed(done: list) -> dict:
    """What the driver reports of the engines' `finish_weight_update` results."""
    return {"weight_version": done[0]["weight_version"], "num_tensors": done[0]["num_tensors"],
            "load": "+".join(sorted({d.get("load", "") for d in done})),
            "packed_from_copy": sum(d.get("packed_from_copy", 0) for d in done)}


def _counted(buckets: Iterable[Bucket], stats: SyncStats) -> Iterator[Bucket]:
    for bucket in buckets:
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket


def stream_buckets(buckets: Iterable[Bucket], fleet, *, send: bool,
                   transport: Callable[[Any, Iterable[Bucket]], dict] = object_store_transport) -> SyncStats:
    """Drains `buckets` (always: the generator may be collective) and, if `send`, passes them through
    `transport(fleet, buckets)`. For streams of named tensors from anywhere (not the Megatron sync)."""
    stats = SyncStats(sent=send)
    t0 = time.perf_counter()
    counted = _counted(buckets, stats)
    try:
        if send:
            result = transport(fleet, counted)
            stats.weight_version = (result or {}).get("weight_version")
            stats.engine_load = (result or {}).get("load", "")
            stats.engine_packed_from_copy = (result or {}).get("packed_from_copy", 0)
    finally:
        # The generator may be collective: even when the transport stopped early or failed, this rank runs
        # it to its end so the other ranks are not left waiting.
        for _ in counted:
            pass
    stats.seconds = time.perf_counter() - t0
    return stats


# ------------------------------------------------------------------------------- the Megatron sync


def node_ip() -> str:
    """This process's node address as Ray reports it (the Megatron ranks are Ray actors), else the hostname's."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def engine_key(fleet) -> tuple:
    """Identity of the fleet's engines (an engine restarted by the fleet is a new actor)."""
    return tuple(getattr(e, "_actor_id", None).hex() if hasattr(e, "_actor_id") else id(e) for e in fleet.engines)


def _cached_plan(actor, chunks, arch, bucket_bytes: int, dtype: torch.dtype) -> list[FlatBucket]:
    """This stage's bucket plan (`plan_flat_buckets(all_stages=False)`), kept on the actor (it holds views of
    the actor's parameters) and made again only when a parameter, its storage, shape or dtype, the bucket size
    or the export dtype changed."""
    from luffy_megatron.convert.export import plan_flat_buckets

    key = (id(arch), bucket_bytes, dtype, tuple((id(p), p.data_ptr(), p.dtype, tuple(p.shape))
                                                 for c in chunks for p in c.parameters()))
    cached = getattr(actor, "_luffy_sync_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    buckets = plan_flat_buckets(chunks, arch=arch, bucket_bytes=bucket_bytes, dtype=dtype, all_stages=False)
    try:
        actor._luffy_sync_plan = (key, buckets)
    except AttributeError:  # an actor that takes no attributes: plan every time
        pass
    return buckets


class SyncContext:
    """What one rank knows about the sync in progress (made by `sync_actor_to_engines`)."""

    def __init__(self, actor, fleet, *, bucket_bytes: int, dtype: torch.dtype, timeout_s: float):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.actor, self.fleet, self.dtype, self.timeout_s = actor, fleet, dtype, timeout_s
        self.bucket_bytes = bucket_bytes
        self.chunks = actor._unwrapped()
        self.arch = actor.arch
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.cp_rank = ps.get_context_parallel_rank()
        first_replica = self.dp_rank == 0 and self.cp_rank == 0
        if first_replica and self.tp_rank == 0:
            self.role = "driver" if self.pp_rank == 0 else "sender"
        else:
            self.role = "contributor" if first_replica else "idle"
        self.senders_group = ps.get_pipeline_model_parallel_group() if self.pp_size > 1 else None
        self.sender_ranks = (dist.get_process_group_ranks(self.senders_group) if self.senders_group is not None
                             else [self.rank])
        self.stats = ExportStats()
        self.buckets: list[FlatBucket] = _cached_plan(actor, self.chunks, self.arch, bucket_bytes, dtype) if self.role != "idle" else []
        self._buffer_for: Callable = lambda bucket: None
        self.fill_mode = ""  # how the stage's TP group filled its buckets: gather (shards to TP rank 0) | shared
        params = [p for c in self.chunks for p in c.parameters()]
        self.device = params[0].device if params else torch.device("cpu")

    @property
    def is_sender(self) -> bool:
        return self.role in ("driver", "sender")

    @property
    def is_driver(self) -> bool:
        return self.role == "driver"

    @property
    def sender_index(self) -> int:
        return self.pp_rank

    def fill(self, buffer_for: Callable[[FlatBucket], Optional[torch.Tensor]], *,
             shared: bool = False) -> Iterator[tuple[FlatBucket, Any]]:
        """This stage's buckets, filled one by one into `buffer_for(bucket)` (on the sender; None elsewhere).
        Collective over the stage's TP group. `shared`: every TP rank's `buffer_for` maps the same shared memory
        and each writes its own shards into it (`export_flat_buckets(shared=True)`)."""
        from luffy_megatron.convert.export import export_flat_buckets

        self._buffer_for = buffer_for
        self.fill_mode = "shared" if shared else "gather"
        return export_flat_buckets(self.buckets, self.arch, lambda b: self._buffer_for(b), everywhere=False,
                                   stats=self.stats, shared=shared)

    def drain(self, filling: Iterator) -> None:
        """Runs the rest of a `fill` generator into a scratch buffer (after a failure: the TP peers are in the
        exchange and must be let go)."""
        scratch: dict = {}

        def scratch_for(bucket):
            if scratch.get("buf") is None or scratch["buf"].numel() < bucket.nbytes:
                scratch["buf"] = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            return scratch["buf"]

        self._buffer_for = scratch_for
        for _ in filling:
            pass

    def all_gather(self, obj) -> list:
        """`obj` of every sender, in stage order (the senders are the pipeline group of TP rank 0)."""
        import torch.distributed as dist

        if self.senders_group is None:
            return [obj]
        out: list = [None] * self.pp_size
        dist.all_gather_object(out, obj, group=self.senders_group)
        return out

    def agree(self, ok: bool, what: str) -> None:
        """Every sender reports whether its part went well; all raise if one did not (so none waits forever
        for a sender that gave up)."""
        oks = self.all_gather(bool(ok))
        if not all(oks):
            bad = [self.sender_ranks[i] for i, good in enumerate(oks) if not good]
            raise RuntimeError(f"weight sync: {what} failed on sender rank(s) {bad} (see their error)")

    def engine_get(self, refs, what: str):
        """`ray.get` bounded by the sync timeout, naming the engines that did not answer."""
        import ray

        refs_list = refs if isinstance(refs, list) else [refs]
        ready, pending = ray.wait(refs_list, num_returns=len(refs_list), timeout=self.timeout_s)
        if pending:
            idx = [i for i, r in enumerate(refs_list) if r in pending]
            raise TimeoutError(f"weight sync: {what} on engine(s) {idx} did not finish within {self.timeout_s:g}s "
                               "(rollout.request_timeout_s)")
        out = ray.get(refs_list)
        return out if isinstance(refs, list) else out[0]


class FilledAhead:
    """An iterator whose first item is produced at once (an error doing so is raised when it is asked for)."""

    def __init__(self, it: Iterator):
        self.it, self.first, self.error = it, [], None
        try:
            self.first = [next(it)]
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001 - raised to whoever iterates, inside its error handling
            self.error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        if self.first:
            return self.first.pop()
        return next(self.it)


class Transport:
    """Sender side of one transport; one instance per process and fleet (it may keep process groups and
    buffers between syncs). A transport implements `transfer` (move this stage's buckets, driving the `fill`
    generator to its end) and `buffer_for` (the buffer the next bucket is filled into, waiting until one is
    free); `send` wraps it in the engines' update session. Returns {"weight_version": ...} on the driver."""

    name = ""

    def __init__(self, fleet):
        self.fleet = fleet

    def buffer_for(self, bucket: FlatBucket) -> torch.Tensor:
        raise NotImplementedError

    def transfer(self, ctx: SyncContext, filling: Iterator) -> None:
        raise NotImplementedError

    def run(self, ctx: SyncContext) -> dict:
        """The part of rank `ctx` in the sync; the default: senders send, contributors contribute shards."""
        if ctx.role == "idle":
            return {}
        if ctx.role == "contributor":
            for _ in ctx.fill(lambda b: None):
                pass
            return {}
        filling = ctx.fill(self.buffer_for)
        try:
            return self.send(ctx, filling)
        finally:
            ctx.drain(filling)  # a no-op after a full send; after a failure it frees the TP peers

    def ahead(self, ctx: SyncContext, filling: Iterator) -> Iterator:
        """Called while the engines open their update session: a transport whose buffers are ready may fill
        its first bucket meanwhile (returns the iterator `transfer` then gets). Default: nothing."""
        return filling

    def send(self, ctx: SyncContext, filling: Iterator) -> dict:
        """Open the session (driver) -> every sender transfers -> all agree -> close the session (driver)."""
        opening = [e.begin_weight_update.remote() for e in self.fleet.engines] if ctx.is_driver else None
        filling = self.ahead(ctx, filling)
        self._step(ctx, "opening the engines' update session",
                   lambda: opening is None or ctx.engine_get(opening, "begin_weight_update"))
        self._step(ctx, "sending weights", lambda: self.transfer(ctx, filling), abort=True)
        if not ctx.is_driver:
            return {}
        return closed(ctx.engine_get([e.finish_weight_update.remote() for e in self.fleet.engines],
                                     "finish_weight_update"))

    def _step(self, ctx: SyncContext, what: str, fn: Callable, abort: bool = False) -> None:
        """Runs `fn` on every sender, then all agree that it worked; raises this sender's own error, or a
        RuntimeError naming the senders that failed."""
        err = None
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others know
            err = e
        try:
            ctx.agree(err is None, what)
        except RuntimeError:
            if abort:
                self.abort(ctx)
            if err is not None:
                raise err
            raise

    def abort(self, ctx: SyncContext) -> None:
        """Driver, after a failure: close the sessions so the engines stay usable (they may then mix old and
        new weights; the next sync resends everything)."""
        if ctx.is_driver:
            import ray

            try:
                ray.get([e.finish_weight_update.remote(partial=True) for e in self.fleet.engines], timeout=60)
            except Exception as err:  # noqa: BLE001 - already failing
                log.warning("closing the engines' update session after a failed sync: %s", err)

    def close(self) -> None:
        pass


_TRANSPORTS: dict[tuple, Transport] = {}


def transport_for(name: str, fleet) -> Transport:
    """This process's transport object for `fleet` (cached: groups and buffers survive between syncs). A
    different set of engines (one was restarted) gets a new one; the old one is closed."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}; choose one of {', '.join(TRANSPORTS)}")
    key = (name, engine_key(fleet))
    if key not in _TRANSPORTS:
        for old_key in [k for k in _TRANSPORTS if k[0] == name]:
            _TRANSPORTS.pop(old_key).close()
        if name == "collective":
            from luffy_megatron.sync.collective import CollectiveTransport as cls
        elif name == "shared_memory":
            from luffy_megatron.sync.shared_memory import SharedMemoryTransport as cls
        else:
            from luffy_megatron.sync.object_store import ObjectStoreTransport as cls
        _TRANSPORTS[key] = cls(fleet)
    transport = _TRANSPORTS[key]
    transport.fleet = fleet
    return transport


def close_transports() -> None:
    """Closes every cached transport of this process (process groups, shared memory)."""
    while _TRANSPORTS:
        _TRANSPORTS.popitem()[1].close()


def sync_actor_to_engines(
    actor,
    fleet,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: Optional[torch.dtype] = None,
    transport: str = "object_store",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    fallback: Optional[str] = None,
) -> SyncStats:
    """Collective over the Megatron ranks of `actor` (a `MegatronActor`, or anything with `_unwrapped()` and
    `arch`): streams its current weights into the engines of `fleet` (an `EngineFleet`) through `transport`
    (a name of `TRANSPORTS`; `resolve_transport` decides `auto`).

    Tensors are exported in the engines' dtype (`fleet.dtype`, or `dtype`), cast on the owning rank before
    anything moves. Waits on engines are bounded by `timeout_s`. `fallback`: the transport to use instead when
    `shared_memory` cannot reach every engine from every sender on CPU (what `auto` asks for); without it that
    is an error naming the engines. Returns this rank's `SyncStats`; the driver's (global rank 0) carries the
    engines' new `weight_version` and every sender's share in `senders`."""
    if dtype is None:
        if fleet is None:
            raise ValueError("sync_actor_to_engines needs the fleet or an explicit dtype on every rank")
        dtype = fleet.dtype
    t0 = time.perf_counter()
    ctx = SyncContext(actor, fleet, bucket_bytes=bucket_bytes, dtype=dtype, timeout_s=timeout_s)
    stats = SyncStats(transport=transport, role=ctx.role, stage=ctx.pp_rank)
    tr = transport_for(transport, fleet) if fleet is not None else None
    if tr is None and ctx.is_sender:
        raise ValueError("the senders of the weight sync need the EngineFleet")
    if fallback and transport == "shared_memory" and ctx.is_sender and ctx.device.type == "cpu":
        # every sender must see every engine, else all of them switch (the senders decide together)
        if not all(ctx.all_gather(not tr.reachable(ctx))):
            if not getattr(tr, "fell_back", False):
                log.warning("weight sync: engines cannot map the senders' shared memory (another host); "
                            "using the %s transport", fallback)
            tr.fell_back = True
            tr = transport_for(fallback, fleet)
            stats.transport = fallback
    result = tr.run(ctx) if tr is not None else {}
    stats.fill = ctx.fill_mode
    if ctx.is_sender:
        stats.sent = True
        stats.buckets = len(ctx.buckets)
        stats.tensors = sum(len(b.entries) for b in ctx.buckets)
        stats.bytes = sum(b.tensor_bytes for b in ctx.buckets)
        mine = {"rank": ctx.rank, "stage": ctx.pp_rank, "bytes": stats.bytes, "buckets": stats.buckets,
                "tensors": stats.tensors}
        everyone = ctx.all_gather(mine)
        if ctx.is_driver:
            stats.senders = everyone
            stats.bytes = sum(s["bytes"] for s in everyone)
            stats.buckets = sum(s["buckets"] for s in everyone)
            stats.tensors = sum(s["tensors"] for s in everyone)
            stats.weight_version = result.get("weight_version")
            stats.engine_load = result.get("load", "")
            stats.engine_packed_from_copy = result.get("packed_from_copy", 0)
    stats.seconds = time.perf_counter() - t0
    return stats

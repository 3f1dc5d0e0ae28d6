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
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from luffy_megatron.convert.export import DEFAULT_BUCKET_BYTES
from luffy_megatron.sync.base import SyncContext, Transport
from luffy_megatron.sync.collective import CollectiveTransport
from luffy_megatron.sync.object_store import ObjectStoreTransport
from luffy_megatron.sync.shared_memory import SharedMemoryTransport

log = logging.getLogger(__name__)

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


def engine_key(fleet) -> tuple:
    """Identity of the fleet's engines (an engine restarted by the fleet is a new actor)."""
    return tuple(getattr(e, "_actor_id", None).hex() if hasattr(e, "_actor_id") else id(e) for e in fleet.engines)


_CLASSES = {
    "collective": CollectiveTransport,
    "shared_memory": SharedMemoryTransport,
    "object_store": ObjectStoreTransport,
}
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
        _TRANSPORTS[key] = _CLASSES[name](fleet)
    transport = _TRANSPORTS[key]
    transport.fleet = fleet
    return transport


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
                log.warning(
                    "weight sync: engines cannot map the senders' shared memory (another host); using the %s transport",
                    fallback,
                )
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
        mine = {
            "rank": ctx.rank,
            "stage": ctx.pp_rank,
            "bytes": stats.bytes,
            "buckets": stats.buckets,
            "tensors": stats.tensors,
        }
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

"""Weight sync: Megatron shards (any TP x PP) -> HF-named full tensors, in buckets -> rollout engines.

Every Megatron rank calls `sync_actor_to_engines` at the same time: the export is collective (TP
gathers, PP broadcasts), so every rank drains the same bucket generator; only global rank 0 hands
the buckets to a transport. The transport is the seam for faster paths:

* `object_store_transport` (here): rank 0 puts each bucket into Ray's object store once, every engine
  actor pulls it and loads it through `load_weights` (vLLM re-fuses and re-shards for its own TP).
  Works everywhere, CPU included; costs a host copy per bucket.
* colocated engines on GPU (not built yet): pass CUDA IPC handles of a flattened bucket instead of the
  bytes (what verl and NeMo-RL do), or vLLM's own `weight_transfer_config` "ipc" engine.
* disaggregated engines on GPU (not built yet): one NCCL group of rank 0 + every engine worker, the
  bucket broadcast from rank 0 (vLLM's "nccl" weight-transfer engine has the receiving half).

A transport is any callable `(fleet, buckets) -> dict` that consumes the bucket iterator lazily (so
the export on the other ranks is paced by it) and returns stats of what it sent.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from luffy_megatron.convert.export import DEFAULT_BUCKET_BYTES

Bucket = list  # list[tuple[str, torch.Tensor]]
Transport = Callable[[Any, Iterable[Bucket]], dict]


def object_store_transport(fleet, buckets: Iterable[Bucket]) -> dict:
    """Ray object store: one `ray.put` per bucket, every engine pulls it (`EngineFleet`)."""
    return fleet.update_weights_from_buckets(buckets)


@dataclass
class SyncStats:
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    sent: bool = False  # True on the rank that handed the buckets to the transport
    weight_version: Optional[int] = None  # the engines' version after the update (sender only)

    def as_dict(self) -> dict:
        return asdict(self)


def _counted(buckets: Iterable[Bucket], stats: SyncStats) -> Iterator[Bucket]:
    for bucket in buckets:
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket


def stream_buckets(buckets: Iterable[Bucket], fleet, *, send: bool,
                   transport: Transport = object_store_transport) -> SyncStats:
    """Drains `buckets` (always: the generator may be collective) and, if `send`, passes them through
    `transport` to `fleet`. The part of the sync that needs no Megatron; tests drive it directly."""
    stats = SyncStats(sent=send)
    t0 = time.perf_counter()
    counted = _counted(buckets, stats)
    try:
        if send:
            result = transport(fleet, counted)
            stats.weight_version = (result or {}).get("weight_version")
    finally:
        # The export is collective: even when the transport stopped early or failed, this rank runs
        # the generator to its end so the other ranks are not left waiting in a gather/broadcast.
        for _ in counted:
            pass
    stats.seconds = time.perf_counter() - t0
    return stats


def sync_actor_to_engines(
    actor,
    fleet,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: Optional[torch.dtype] = None,
    transport: Transport = object_store_transport,
) -> SyncStats:
    """Collective over the Megatron ranks of `actor` (a `MegatronActor`): streams its current weights to
    the engines of `fleet` (an `EngineFleet`, or None on ranks other than 0 when `dtype` is given).

    Tensors are exported in the engines' dtype (`fleet.dtype`, or `dtype`), cast on the owning stage
    before any broadcast, so no rank moves more bytes than the engines need. Returns this rank's
    `SyncStats`; only rank 0 sends, all ranks count the same buckets."""
    import torch.distributed as dist

    from luffy_megatron.convert.export import iter_hf_weight_buckets

    if dtype is None:
        if fleet is None:
            raise ValueError("sync_actor_to_engines needs the fleet or an explicit dtype on every rank "
                             "(all ranks must export in the same dtype)")
        dtype = fleet.dtype
    send = (dist.get_rank() if dist.is_initialized() else 0) == 0
    if send and fleet is None:
        raise ValueError("global rank 0 sends the weights and needs the EngineFleet")
    buckets = iter_hf_weight_buckets(actor._unwrapped(), actor.arch, bucket_bytes=bucket_bytes, dtype=dtype)
    return stream_buckets(buckets, fleet, send=send, transport=transport)

"""What every weight-sync transport shares: `SyncContext` (one rank's view of the sync in progress: its role,
its stage's bucket plan, the fill generator, collectives over the senders, bounded waits on the engines),
`Transport` (the sender side of a transport: the engines' update session around `transfer`), `FilledAhead`,
`finish_summary` and `node_ip`. The transports (`collective.py`, `shared_memory.py`, `object_store.py`) import
this module; `weights.py` picks one of them.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from luffy_megatron.convert.export import ExportStats, FlatBucket, export_flat_buckets, plan_flat_buckets

log = logging.getLogger(__name__)


def node_ip() -> str:
    """This process's node address as Ray reports it (the Megatron ranks are Ray actors), else the hostname's."""
    try:
        import ray  # lazy: outside Ray there may be none

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def finish_summary(done: list) -> dict:
    """What the driver reports of the engines' `finish_weight_update` results."""
    return {
        "weight_version": done[0]["weight_version"],
        "num_tensors": done[0]["num_tensors"],
        "load": "+".join(sorted({d.get("load", "") for d in done})),
        "packed_from_copy": sum(d.get("packed_from_copy", 0) for d in done),
    }


def _cached_plan(actor, chunks, arch, bucket_bytes: int, dtype: torch.dtype) -> list[FlatBucket]:
    """This stage's bucket plan (`plan_flat_buckets(all_stages=False)`), kept on the actor (it holds views of
    the actor's parameters) and made again only when a parameter, its storage, shape or dtype, the bucket size
    or the export dtype changed."""
    key = (
        id(arch),
        bucket_bytes,
        dtype,
        tuple((id(p), p.data_ptr(), p.dtype, tuple(p.shape)) for c in chunks for p in c.parameters()),
    )
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
        from megatron.core import parallel_state as ps  # lazy: the driver imports this module, never megatron

        self.actor, self.fleet, self.dtype, self.timeout_s = actor, fleet, dtype, timeout_s
        self.bucket_bytes = bucket_bytes
        self.chunks = actor._unwrapped()
        self.arch = actor.arch
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
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
        self.sender_ranks = (
            dist.get_process_group_ranks(self.senders_group) if self.senders_group is not None else [self.rank]
        )
        self.stats = ExportStats()
        self.buckets: list[FlatBucket] = (
            _cached_plan(actor, self.chunks, self.arch, bucket_bytes, dtype) if self.role != "idle" else []
        )
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

    def fill(
        self, buffer_for: Callable[[FlatBucket], Optional[torch.Tensor]], *, shared: bool = False
    ) -> Iterator[tuple[FlatBucket, Any]]:
        """This stage's buckets, filled one by one into `buffer_for(bucket)` (on the sender; None elsewhere).
        Collective over the stage's TP group. `shared`: every TP rank's `buffer_for` maps the same shared memory
        and each writes its own shards into it (`export_flat_buckets(shared=True)`)."""
        self._buffer_for = buffer_for
        self.fill_mode = "shared" if shared else "gather"
        return export_flat_buckets(
            self.buckets, self.arch, lambda b: self._buffer_for(b), everywhere=False, stats=self.stats, shared=shared
        )

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
        import ray  # lazy: only the senders wait on engines

        refs_list = refs if isinstance(refs, list) else [refs]
        ready, pending = ray.wait(refs_list, num_returns=len(refs_list), timeout=self.timeout_s)
        if pending:
            idx = [i for i, r in enumerate(refs_list) if r in pending]
            raise TimeoutError(
                f"weight sync: {what} on engine(s) {idx} did not finish within {self.timeout_s:g}s "
                "(rollout.request_timeout_s)"
            )
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
        self._step(
            ctx,
            "opening the engines' update session",
            lambda: opening is None or ctx.engine_get(opening, "begin_weight_update"),
        )
        self._step(ctx, "sending weights", lambda: self.transfer(ctx, filling), abort=True)
        if not ctx.is_driver:
            return {}
        return finish_summary(
            ctx.engine_get([e.finish_weight_update.remote() for e in self.fleet.engines], "finish_weight_update")
        )

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
            import ray  # lazy: only the driver closes the engines' sessions

            try:
                ray.get([e.finish_weight_update.remote(partial=True) for e in self.fleet.engines], timeout=60)
            except Exception as err:  # noqa: BLE001 - already failing
                log.warning("closing the engines' update session after a failed sync: %s", err)

    def close(self) -> None:
        pass

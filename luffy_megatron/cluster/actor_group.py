"""The Megatron ranks as Ray actors: one actor per rank, placed into its GPU bundle, called together (SPMD).

Each actor sets the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
before building its `MegatronActor`, so megatron-core sees an ordinary torchrun-like world (NCCL on GPUs, gloo
on CPU). The rendezvous is rank 0's: its own worker reports its node's IP and a free port there, because rank 0
may land on any node (not the driver's).

LOCAL_RANK is the index of the rank's GPU in the ``CUDA_VISIBLE_DEVICES`` Ray set for the actor, i.e. the
device `torch.cuda.set_device(LOCAL_RANK)` must pick: Ray shows each actor only its own GPU, so it is 0 unless
someone changes how Ray sets devices. (Node-local position is in the layout: `Placement.layout.ranks`.)

Every method call goes to all ranks with the same arguments; the result of rank 0 is returned (all ranks
return the same values: the actor shares log-probs and metrics across the model). Each rank keeps a short log
of its calls (`events`), so the order of colocated phases is visible from outside.
"""

from __future__ import annotations

import collections
import gc
import os
import socket
import sys
import time
from typing import Any, Optional

import ray
import torch

from luffy_megatron.cluster.cpu_cores import rank_cores, ranks_keep_off_engines
from luffy_megatron.cluster.offload import (
    _grad_buffers,
    _torch_optimizers,
    device_holdings,
    offload_to_host,
    reload_to_device,
)
from luffy_megatron.cluster.supervision import RankCallTimeout
from luffy_megatron.sync.shared_memory import ipc_slot_bytes
from luffy_megatron.utils.memory_ledger import MemoryLedger

EVENT_LOG_LENGTH = 256
# `run` calls that hold the weight-sync buckets on the rank's device while they run (utils/memory_ledger.py)
SYNC_CALLS = frozenset({"sync_weights"})
# bound on the ranks' exit barrier at shutdown: they are closed together, after their last call has returned
CLOSE_TIMEOUT_S = 15.0


def free_port(host: str = "") -> int:
    """A TCP port that is free on every interface of this host (torch's TCPStore listens on all of them)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_device_index() -> int:
    """Index of this actor's (first) Ray-assigned GPU within CUDA_VISIBLE_DEVICES; 0 without GPUs."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d != ""]
    assigned = [str(g) for g in ray.get_gpu_ids()]
    if assigned and assigned[0] in visible:
        return visible.index(assigned[0])
    return 0


def placement_info() -> dict[str, Any]:
    """Where the calling Ray worker runs, as Ray set it up."""
    ctx = ray.get_runtime_context()
    pg = ray.util.get_current_placement_group()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "placement_group": pg.id.hex() if pg is not None else None,
    }


class _RankWorker:
    def __init__(self, rank: int, world_size: int):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_device_index()))
        self.rank = rank
        self.cpus = sorted(os.sched_getaffinity(0))  # what Ray gave this process, before any build narrows it
        self.actor = None
        self.offloaded = None
        self.events: collections.deque = collections.deque(maxlen=EVENT_LOG_LENGTH)
        # what this rank holds on its GPU at every transition (the memory plan's phases, perf/phase_contract.py)
        self.ledger = MemoryLedger(self._holdings)

    def _event(self, name: str, t0: float) -> None:
        self.events.append((name, t0, time.time()))

    def _holdings(self) -> set[str]:
        """The actor's state on the GPU, and the CUDA IPC weight-sync slots, kept from the first sync on."""
        held = device_holdings(self.actor, self.offloaded)
        return held | {"sync_buckets"} if ipc_slot_bytes() else held

    # ---------------------------------------------------------------- setup

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it (called on rank 0)."""
        return ray.util.get_node_ip_address(), free_port()

    def set_rendezvous(self, master_addr: str, master_port: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))

    def info(self) -> dict[str, Any]:
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        # the GPU model once the actor has set up CUDA (build); asked no earlier, to create no context of its own
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return {"rank": self.rank, **placement_info(), "env": env, "cuda_device_name": device}

    def build(self, cfg, hf_dir: str, pad_token_id: int, fresh: bool = False) -> int:
        """Builds this rank's actor (once); `fresh`: drop the one it has first (a new run on these ranks)."""
        # lazy: a rank loads torch.distributed only when it builds the actor (`close` relies on it)
        from luffy_megatron.actor.megatron_actor import MegatronActor

        t0 = time.time()
        if not torch.cuda.is_available():  # Ray gives CPU-less actors one thread; ranks take turns with the engines
            free = ranks_keep_off_engines(cfg.cluster.cpu_rank_cores, cfg.trainer.overlap)
            cores = rank_cores(cfg.rollout.num_engines or 1, self.cpus, free=free)
            os.sched_setaffinity(0, cores)  # free: the engines generate while the ranks train, on their own cores
            torch.set_num_threads(max(1, len(cores) // int(os.environ["WORLD_SIZE"])))
        with self.ledger.transition("build"):
            if fresh and self.actor is not None:
                self.actor = self.offloaded = None
                gc.collect()  # the old model, optimizer and buffers are freed before the new ones are made
            if self.actor is None:
                self.actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=pad_token_id)
        self._event("build", t0)
        return self.actor.step

    # ---------------------------------------------------------------- calls

    def call(self, method: str, *args, **kwargs) -> Any:
        t0 = time.time()
        try:
            with self.ledger.transition(method):  # the update makes the Adam moments on its first step
                return getattr(self.actor, method)(*args, **kwargs)
        finally:
            self._event(method, t0)

    def run(self, fn, *args, **kwargs) -> Any:
        """Run `fn(actor, *args, **kwargs)` on this rank (checkpointing, weight sync, ...)."""
        t0, name = time.time(), getattr(fn, "__name__", "run")
        try:
            with self.ledger.transition(name, frozenset({"sync_buckets"}) if name in SYNC_CALLS else frozenset()):
                return fn(self.actor, *args, **kwargs)
        finally:
            self._event(name, t0)

    # ---------------------------------------------------------------- actor.offload_during_rollout

    def offload_to_host(self) -> dict[str, int]:
        """Optimizer state (and the KL reference's weights) to host, gradient buffers released (see
        `cluster.offload`). No-op when already out."""
        t0 = time.time()
        with self.ledger.transition("offload_to_host"):
            if self.offloaded is None:
                reference = getattr(self.actor, "reference", None)
                self.offloaded = offload_to_host(
                    self.actor.optimizer, self.actor.model, reference.chunks if reference is not None else ()
                )
        self._event("offload_to_host", t0)
        return {"host_bytes": self.offloaded.host_bytes, "freed_bytes": self.offloaded.freed_bytes}

    def reload_to_device(self) -> None:
        t0 = time.time()
        with self.ledger.transition("reload_to_device"):
            if self.offloaded is not None:
                reload_to_device(self.offloaded)
                self.offloaded = None
        self._event("reload_to_device", t0)

    def release_cache(self) -> None:
        """Returns the blocks torch's caching allocator keeps (activations, logits and log-prob chunks of the
        update) to the driver before a colocated engine wakes: vLLM's wake_up needs them physically free, and
        memory cached by another process's allocator is not. A no-op without CUDA. `offload_to_host` does the
        same after its move."""
        t0 = time.time()
        with self.ledger.transition("release_cache"):  # on CUDA the record shows what the allocator kept
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._event("release_cache", t0)

    def memory_ledger(self) -> list[dict]:
        return self.ledger.dump()

    def training_state(self) -> dict[str, Any]:
        """Fingerprints of this rank's optimizer state and gradient buffers, and where they are (for tests)."""
        state_sum, devices, state_bytes = 0.0, set(), 0
        for opt in _torch_optimizers(self.actor.optimizer):
            for state in opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor) and t.numel():
                        state_sum += float(t.detach().double().abs().sum())
                        devices.add(str(t.device))
                        state_bytes += t.numel() * t.element_size()
        grad_bytes = sum(b.grad_data.untyped_storage().nbytes() for b in _grad_buffers(self.actor.model))
        reference = getattr(self.actor, "reference", None)
        ref = [p for c in reference.chunks for p in c.parameters()] if reference is not None else []
        return {
            "optimizer_state_abs_sum": state_sum,
            "optimizer_state_bytes": state_bytes,
            "optimizer_state_devices": sorted(devices),
            "grad_buffer_bytes": grad_bytes,
            "offloaded": self.offloaded is not None,
            "step": self.actor.step,
            # the KL reference's weights: where they live (their storages) and their values
            "reference_ptrs": [p.data_ptr() for p in ref],
            "reference_abs_sum": sum(float(p.detach().double().abs().sum()) for p in ref),
        }

    def get_events(self) -> list[tuple[str, float, float]]:
        return list(self.events)

    # ---------------------------------------------------------------- teardown

    def close(self, timeout_s: float) -> dict[str, Any]:
        """End this rank's torch.distributed in order (`models.parallel.shutdown_distributed`: barrier with the
        other ranks, megatron's groups and the world destroyed, gloo's worker threads joined or idle) before
        the process is killed. Every rank is called at once (`ActorGroup.shutdown`). Returns whether it
        completed and this process's gloo worker threads before and after."""
        t0 = time.time()
        # the model, optimizer and buffers hold groups too: drop them so the groups can be freed (threads joined)
        self.actor = None
        self.offloaded = None
        if "torch.distributed" not in sys.modules:  # never built: no groups (and no torch import just for this)
            return {"ok": True, "gloo_workers_before": 0, "gloo_workers_after": 0}
        from luffy_megatron.models.parallel import gloo_worker_states, shutdown_distributed  # lazy: see above

        before = len(gloo_worker_states())
        try:
            ok = shutdown_distributed(timeout_s)
        finally:
            self._event("close", t0)
        return {"ok": ok, "gloo_workers_before": before, "gloo_workers_after": len(gloo_worker_states())}


class ActorGroup:
    """The Megatron ranks of a `cluster.placement.Placement`, one Ray actor each, in their GPU bundles."""

    # Why the ranks cannot end together (a rank died, or a call hung: the others may be stuck in a collective
    # with it, their `close` queued behind it), set by `cluster.supervision.GuardedRanks`; `shutdown` then kills
    # them without the exit barrier.
    broken: Optional[str] = None
    # bound on every call on the ranks made here (`build` takes trainer.rank_call_timeout_s; the driver's
    # step calls go through `cluster.supervision.GuardedRanks`, bounded the same way)
    call_timeout_s: float = 4 * 3600.0

    def __init__(self, placement, *, start_timeout_s: Optional[float] = None):
        world = placement.layout.world_size
        self.placement = placement
        self.workers = [
            ray.remote(_RankWorker).options(**placement.rank_options(r)).remote(r, world) for r in range(world)
        ]
        timeout = start_timeout_s if start_timeout_s is not None else placement.timeout_s
        try:
            # Rank 0's own node and port: it may sit on any node.
            self.master_addr, self.master_port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=timeout)
            ray.get(
                [w.set_rendezvous.remote(self.master_addr, self.master_port) for w in self.workers], timeout=timeout
            )
        except BaseException as err:
            self.shutdown(close=False)  # nothing built yet: no process groups, and the actors may not even run
            if isinstance(err, ray.exceptions.GetTimeoutError):
                raise TimeoutError(
                    f"the {world} Megatron rank actors did not start within {timeout:g}s "
                    "(cluster.placement_timeout_s) although their GPUs were granted"
                ) from None
            raise

    def build(self, cfg, hf_dir: str, pad_token_id: int, fresh: bool = False) -> int:
        """Builds the model on every rank, bounded by trainer.rank_call_timeout_s (a conversion from HF can take
        many minutes; a rank that hangs in its process-group rendezvous must not hold the job forever)."""
        self.call_timeout_s = cfg.trainer.rank_call_timeout_s
        return self._get(
            "the model build", [w.build.remote(cfg, hf_dir, pad_token_id, fresh=fresh) for w in self.workers]
        )[0]

    def call(self, method: str, *args, **kwargs) -> Any:
        return self._get(method, [w.call.remote(method, *args, **kwargs) for w in self.workers])[0]

    def run(self, fn, *args, **kwargs) -> Any:
        return self._get(getattr(fn, "__name__", "run"), [w.run.remote(fn, *args, **kwargs) for w in self.workers])[0]

    def offload_to_host(self) -> dict[str, int]:
        return self._get("offload_to_host", [w.offload_to_host.remote() for w in self.workers])[0]

    def reload_to_device(self) -> None:
        self._get("reload_to_device", [w.reload_to_device.remote() for w in self.workers])

    def release_cache(self) -> None:
        self._get("release_cache", [w.release_cache.remote() for w in self.workers])

    def infos(self) -> list[dict[str, Any]]:
        return self._get("info", [w.info.remote() for w in self.workers])

    def events(self) -> list[list[tuple[str, float, float]]]:
        return self._get("get_events", [w.get_events.remote() for w in self.workers])

    def memory_ledgers(self) -> list[list[dict]]:
        """Every rank's transitions with what it held on its GPU before and after (`utils.memory_ledger`)."""
        return self._get("memory_ledger", [w.memory_ledger.remote() for w in self.workers])

    def _get(self, what: str, refs: list) -> list:
        """Every rank's result of `what`, within `call_timeout_s`. A rank that has not answered by then is a
        `RankCallTimeout` (one `luffy-train: error:` line) naming the call and the setting; the group is then
        `broken` (the others may wait in a collective with it), so `shutdown` kills the ranks without the exit
        barrier."""
        try:
            return ray.get(refs, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [r for r, ref in enumerate(refs) if ref not in ready]
            self.broken = f"{what} timed out on rank(s) {late}"
            raise RankCallTimeout(
                f"{what} on the Megatron ranks did not finish within {self.call_timeout_s:g}s "
                f"(trainer.rank_call_timeout_s): no answer from rank(s) {late}",
                what=what,
                refs=refs,
            ) from None

    def shutdown(self, close: bool = True, close_timeout_s: float = CLOSE_TIMEOUT_S) -> list:
        """Close every rank's process groups together (bounded: a rank that does not answer within
        `close_timeout_s` + 15 s is killed as it is), then kill the actors. Returns each rank's `close` result
        (or the error a dead or stuck rank gave); [] when there were no ranks, `close` is False or the group is
        `broken` (a rank died or hung: the others are killed as they are)."""
        results: list = []
        if close and self.workers and self.broken is None:
            refs = [w.close.remote(close_timeout_s) for w in self.workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=close_timeout_s + 15)
            for ref in refs:
                try:
                    results.append(
                        ray.get(ref, timeout=0)
                        if ref in ready
                        else TimeoutError(f"no answer within {close_timeout_s + 15:g}s")
                    )
                except Exception as err:  # noqa: BLE001 - a rank that died before: nothing to close there
                    results.append(err)
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        return results

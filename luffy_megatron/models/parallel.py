"""Process-group helpers: a world-size-1 group for the single-process converters, megatron-core
parallel_state initialization that works on gloo (CPU) and NCCL (GPU), and the orderly end of both
(`shutdown_distributed`, run at interpreter exit by every process that made a group through this module).

Why the end needs care (measured, torch 2.13 CPU, gloo): a gloo collective runs on one of its group's worker
threads (`pt_gloo_runloop`), which drops its reference to the work's tensors only after it has woken the caller.
When the caller's tensor was a temporary, its Python object is already gone by then, so the worker's drop is
the last one and must take the GIL to free it. If the main thread has meanwhile begun finalising the
interpreter, CPython ends the worker with `pthread_exit`, whose forced unwind through the work's (noexcept)
destructor is `std::terminate`: "terminate called without an active exception", exit -6, after the script
has printed its result (gdb: runLoop -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject ->
gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> std::terminate). `dist.destroy_process_group()` does
not stop gloo's threads (the backend's `shutdown()`/`abort()` leave them running, measured); they end only
when the group object is freed, and megatron-core keeps ~20 groups in module globals (some of which its own
`destroy_model_parallel` forgets) and in caches (RoPE's lru_cache holds a CP group), so they live into
finalisation.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import socket
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from luffy_megatron.compat.megatron_cpu import apply_cpu_shim
from luffy_megatron.utils import scratch

logger = logging.getLogger(__name__)

# bound on the exit barrier (all ranks must reach shutdown within it, else the teardown is skipped with a warning)
# how long the ranks of a world started outside torchrun (the Ray rank actors) wait for each other to join
INIT_TIMEOUT_ENV = "LUFFY_DIST_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 900.0
SHUTDOWN_TIMEOUT_ENV = "LUFFY_DIST_SHUTDOWN_TIMEOUT_S"
DEFAULT_SHUTDOWN_TIMEOUT_S = 60.0
GLOO_WORKER_THREAD_NAME = "pt_gloo_runloop"  # torch names gloo's work threads so (ProcessGroupGloo::runLoop)
_shutdown_registered = False
_barrier_failed = False  # an exit barrier gave up: at exit, neither wait again nor free groups a worker may still use
_store_dir: Optional[str] = None  # the scratch directory of a private world's FileStore, until the world ends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_local_device() -> Optional[torch.device]:
    """On a GPU machine, make this process's current CUDA device its own: `LOCAL_RANK` (set by torchrun, and
    by the Ray rank actors for the GPUs Ray made visible to them), index 0 without it. Without this every
    rank of a node computes on cuda:0. Returns the device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "start one process per GPU (torchrun --nproc_per_node=<GPUs per node>)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def ensure_process_group(*, cpu: bool = False) -> bool:
    """Initializes torch.distributed if it is not: from torchrun's environment when present,
    otherwise a private world of one (a FileStore, so no port is shared with anyone).
    On GPUs the process is bound to its `LOCAL_RANK` device first (and NCCL is told which device
    is this rank's). `cpu`: gloo and no device even on a GPU machine (the converters, which build on the
    host). Returns True if this call created the group."""
    device = None if cpu else bind_local_device()
    register_shutdown()
    if dist.is_initialized():
        return False
    backend = "nccl" if device is not None else "gloo"
    device_kwargs = {"device_id": device} if device is not None else {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent's store, its own rendezvous deadline
            dist.init_process_group(backend, **device_kwargs)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=rendezvous_store(), rank=rank, world_size=world, **device_kwargs)
    else:
        _init_private_world(backend, device_kwargs)
    return True


def rendezvous_store(timeout_s: Optional[float] = None) -> dist.TCPStore:
    """The world's store at MASTER_ADDR:MASTER_PORT (rank 0 serves it), what `init_process_group` would make
    from the environment, but with a deadline of its own for the ranks to join (`LUFFY_DIST_INIT_TIMEOUT_S`,
    default 900 s) that leaves the collectives' timeout as torch sets it. A rank that is not there in time is
    a TimeoutError naming the address, the world and the setting."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if timeout_s is None:
        timeout_s = float(os.environ.get(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S))
    try:
        return dist.TCPStore(
            host,
            port,
            world,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except RuntimeError as err:  # DistStoreError / DistNetworkError: the deadline passed, or no one listens
        raise TimeoutError(
            f"rank {rank}: the torch.distributed rendezvous at {host}:{port} (a world of {world} ranks) did not "
            f"complete within {timeout_s:g}s ({INIT_TIMEOUT_ENV}): {str(err).splitlines()[0] if str(err) else err}"
        ) from None


def _init_private_world(backend: str, device_kwargs: dict) -> None:
    """A world of one on a FileStore in a scratch directory of the temp dir (`utils.scratch`, kind "pg"). The
    store's file is read again whenever a group is made (megatron-core makes its groups after this), so the
    directory stays until `shutdown_distributed` has destroyed the groups, or until this process exits."""
    global _store_dir
    _remove_store_dir()  # of an earlier private world that was destroyed without shutdown_distributed
    tmp = scratch.temp_dir()
    scratch.sweep(tmp)
    _store_dir = scratch.make_dir(tmp, "pg")
    try:
        store = dist.FileStore(os.path.join(_store_dir, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **device_kwargs)
    except BaseException:
        _remove_store_dir()
        raise


def _remove_store_dir() -> None:
    global _store_dir
    if _store_dir is not None:
        scratch.remove(_store_dir)
        _store_dir = None


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1, *, cpu: bool = False) -> None:
    """Initializes megatron-core parallel_state (and the process group if needed; `cpu`: a gloo one, see
    `ensure_process_group`). If it is already initialized with other sizes it is rebuilt. Rank order is
    megatron's default (tp-cp-ep-dp-pp: TP fastest); data parallel is what TP x CP x PP leaves."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    apply_cpu_shim()
    ensure_process_group(cpu=cpu)
    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp
            and ps.get_virtual_pipeline_model_parallel_world_size() == vpp
            and ps.get_context_parallel_world_size() == cp
        )
        if same:
            return
        ps.destroy_model_parallel()
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )


# ------------------------------------------------------------------------------------------------ shutdown


def register_shutdown() -> None:
    """Run `shutdown_distributed` when this interpreter exits (once per process). `ensure_process_group` (so
    `init_model_parallel` and every `MegatronActor`) calls it; a script that calls `dist.init_process_group`
    itself should call it too, or `shutdown_distributed()` at its end."""
    global _shutdown_registered
    if not _shutdown_registered:
        atexit.register(_shutdown_at_exit)
        _shutdown_registered = True


def _shutdown_at_exit() -> None:
    # After an uncaught exception (or a barrier that already gave up) the other ranks are not coming to a
    # barrier, and a worker may still be in a collective with them, whose group must then not be freed (freeing
    # joins its threads). Only let the workers settle then; the launcher ends the other ranks.
    orderly = getattr(sys, "last_value", None) is None and not _barrier_failed
    try:
        shutdown_distributed(barrier=orderly, destroy=orderly)
    except Exception as err:  # noqa: BLE001 - never turn a clean exit into a traceback at exit
        logger.warning("torch.distributed shutdown at exit failed: %s", err)


def shutdown_timeout_s() -> float:
    raw = os.environ.get(SHUTDOWN_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_SHUTDOWN_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{SHUTDOWN_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def shutdown_distributed(timeout_s: Optional[float] = None, *, barrier: bool = True, destroy: bool = True) -> bool:
    """End torch.distributed and megatron-core's groups in an order that is safe on every rank, so that no
    gloo worker thread is still alive, or about to need the GIL, when the interpreter finalises:

    1. a barrier over the world, bounded by `timeout_s` (default `$LUFFY_DIST_SHUTDOWN_TIMEOUT_S`, 60 s): every
       rank has finished its collectives before anyone frees a group (which closes its sockets; with a plain
       env:// rendezvous rank 0 also serves the store). On timeout or a broken peer nothing is torn down (a
       worker may be stuck in a collective with the missing rank and freeing would wait for it); it warns.
    2. megatron-core's groups (all of parallel_state's globals holding one), then the default group and every
       other registered one (`dist.destroy_process_group()`), then a garbage collection: a group that nothing
       else holds is freed here, which joins its worker threads while the interpreter is fully alive.
    3. the gloo worker threads of groups still held elsewhere (model objects, caches) are given the GIL until
       each is idle (bounded), so none still has a Python-owned tensor to free at finalisation.

    Safe to call more than once, without a process group, and after `dist.destroy_process_group()` (then it
    does steps 2-3 for what megatron-core still holds). Returns True when it completed."""
    global _barrier_failed
    timeout_s = shutdown_timeout_s() if timeout_s is None else timeout_s
    initialized = dist.is_available() and dist.is_initialized()
    if initialized and barrier and dist.get_world_size() > 1:
        problem = _bounded_barrier(timeout_s)
        if problem is not None:
            _barrier_failed = True
            logger.warning(
                "rank %d: the exit barrier failed (%s); process groups left as they are. Raise %s if "
                "ranks legitimately finish more than %gs apart.",
                dist.get_rank(),
                problem,
                SHUTDOWN_TIMEOUT_ENV,
                timeout_s,
            )
            wait_gloo_workers_idle(
                timeout_s=min(timeout_s, 10.0)
            )  # a worker may still have a Python-owned tensor to free
            return False
    if destroy:
        _forget_megatron_groups()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
        _remove_store_dir()  # no group is left to read the private world's store
    idle = wait_gloo_workers_idle(timeout_s=min(timeout_s, 10.0))
    if not idle:
        logger.warning("gloo worker threads still busy %gs after the exit barrier", min(timeout_s, 10.0))
    return idle


def _bounded_barrier(timeout_s: float) -> Optional[str]:
    """A world barrier that gives up after `timeout_s`; returns None, or what went wrong."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if dist.get_backend() == "gloo":
            # send/recv run in this thread, not on the group's workers: nothing is left queued on a timeout
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            work = dist.barrier(async_op=True)
            if not work.wait(timeout=timeout):
                return f"no barrier within {timeout_s:g}s"
    except Exception as err:  # noqa: BLE001 - reported as the barrier's outcome
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _holds_group(value) -> bool:
    group_type = dist.ProcessGroup
    if isinstance(value, group_type):
        return True
    if isinstance(value, dict):
        return any(_holds_group(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_group(v) for v in value)
    return False


def _forget_megatron_groups() -> None:
    """megatron-core's `destroy_model_parallel`, then every parallel_state global it leaves holding a group
    (0.16.1 keeps the intra-partial DP groups and the hybrid/hierarchical CP groups)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None:  # never imported: it holds nothing
        return
    ps.destroy_model_parallel()
    for name, value in list(vars(ps).items()):
        if name.startswith("_") and not name.startswith("__") and _holds_group(value):
            setattr(ps, name, type(value)() if isinstance(value, (dict, list, set)) else None)


def gloo_worker_states() -> list[str]:
    """Scheduler states (/proc: R running, S sleeping, ...) of this process's gloo worker threads; [] off Linux."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    states = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if name == GLOO_WORKER_THREAD_NAME:
            states.append(rest[:1])
    return states


def wait_gloo_workers_idle(timeout_s: float = 10.0, quiet_polls: int = 3, interval_s: float = 0.01) -> bool:
    """Release the GIL until every gloo worker thread has been asleep (waiting for work) for `quiet_polls`
    polls in a row; a worker finishing a work that must free a Python-owned tensor takes the GIL meanwhile
    and is seen running. True when idle (or none left), False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while gloo_worker_states():
        time.sleep(interval_s)  # the GIL is free meanwhile
        states = gloo_worker_states()
        quiet = quiet + 1 if all(s == "S" for s in states) else 0
        if quiet >= quiet_polls:
            return True
        if time.monotonic() >= deadline:
            return False
    return True

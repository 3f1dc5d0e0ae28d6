"""torchrun script: how a rank ends torch.distributed (`luffy_megatron.models.parallel.shutdown_distributed`).

    exit_race.py race | megatron | late_peer

race: a subgroup held in a module global (as megatron-core holds its groups) and, as the script's last
    statement, one all-reduce of a temporary tensor on it, rank 0 arriving late. Rank 0's collective completes
    at once and its gloo worker thread drops the tensor's last reference only after the main thread has gone
    on to exit; without an orderly shutdown that drop needs the GIL during interpreter finalisation and the
    rank aborts ("terminate called without an active exception", exit -6) after it has reported. Only the
    exit hook that `ensure_process_group` registers stands between the two.
megatron: megatron-core's groups (TP=2), then `shutdown_distributed`; reports the gloo worker threads before
    and after and which parallel_state globals still hold a group.
late_peer: rank 1 reaches the shutdown 8 s after rank 0, whose barrier is bounded to 1 s: rank 0 must give up
    within its bound and say so, not wait.
"""

import sys
import time

import torch
import torch.distributed as dist

from luffy_megatron.models.parallel import ensure_process_group, gloo_worker_states, shutdown_distributed
from tests.dist.launcher import report

mode = sys.argv[1]
if mode == "race":
    ensure_process_group()
    GROUP = dist.new_group(list(range(dist.get_world_size())))
    if dist.get_rank() == 0:
        report({"mode": mode})
        time.sleep(1.0)
    dist.all_reduce(torch.ones(8), group=GROUP)  # the last statement: nothing after it lets the worker finish
elif mode == "megatron":
    from luffy_megatron.models.parallel import init_model_parallel

    init_model_parallel(tp=2)
    from megatron.core import parallel_state as ps

    dist.all_reduce(torch.ones(8), group=ps.get_tensor_model_parallel_group())
    before = len(gloo_worker_states())
    ok = shutdown_distributed(timeout_s=30)
    held = sorted(k for k, v in vars(ps).items() if isinstance(v, dist.ProcessGroup)
                  or (isinstance(v, (list, dict)) and any(isinstance(x, dist.ProcessGroup)
                                                          for x in (v.values() if isinstance(v, dict) else v))))
    if int(__import__("os").environ["RANK"]) == 0:
        report({"ok": ok, "gloo_workers_before": before, "gloo_workers_after": len(gloo_worker_states()),
                "initialized_after": dist.is_initialized(), "megatron_globals_holding_groups": held})
elif mode == "late_peer":
    ensure_process_group()
    rank = dist.get_rank()
    if rank == 1:
        time.sleep(8.0)
    t0 = time.monotonic()
    ok = shutdown_distributed(timeout_s=1.0)
    if rank == 0:
        report({"ok": ok, "elapsed_s": time.monotonic() - t0})
else:
    raise SystemExit(f"unknown mode {mode!r}: race, megatron or late_peer")

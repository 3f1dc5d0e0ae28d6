"""Process-group helpers: a world-size-1 group for the single-process converters, and
megatron-core parallel_state initialization that works on gloo (CPU) and NCCL (GPU)."""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Optional

import torch
import torch.distributed as dist


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


def ensure_process_group() -> bool:
    """Initializes torch.distributed if it is not: from torchrun's environment when present,
    otherwise a private world of one (a FileStore, so no port is shared with anyone).
    On GPUs the process is bound to its `LOCAL_RANK` device first (and NCCL is told which device
    is this rank's). Returns True if this call created the group."""
    device = bind_local_device()
    if dist.is_initialized():
        return False
    backend = "nccl" if device is not None else "gloo"
    device_kwargs = {"device_id": device} if device is not None else {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **device_kwargs)
    else:
        store_file = tempfile.NamedTemporaryFile(prefix="luffy-pg-", delete=False).name
        store = dist.FileStore(store_file, 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **device_kwargs)
    return True


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1) -> None:
    """Initializes megatron-core parallel_state (and the process group if needed). If it is
    already initialized with other sizes it is rebuilt. Rank order is megatron's default
    (tp-cp-ep-dp-pp: TP fastest); data parallel is what TP x CP x PP leaves."""
    from megatron.core import parallel_state as ps

    from luffy_megatron.models.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    ensure_process_group()
    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp
                and ps.get_virtual_pipeline_model_parallel_world_size() == vpp
                and ps.get_context_parallel_world_size() == cp)
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

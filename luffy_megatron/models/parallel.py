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


def ensure_process_group() -> bool:
    """Initializes torch.distributed if it is not: from torchrun's environment when present,
    otherwise a private world of one (a FileStore, so no port is shared with anyone).
    Returns True if this call created the group."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        store_file = tempfile.NamedTemporaryFile(prefix="luffy-pg-", delete=False).name
        store = dist.FileStore(store_file, 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return True


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None) -> None:
    """Initializes megatron-core parallel_state (and the process group if needed). If it is
    already initialized with other sizes it is rebuilt."""
    from megatron.core import parallel_state as ps

    from luffy_megatron.models.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    ensure_process_group()
    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp
                and ps.get_virtual_pipeline_model_parallel_world_size() == vpp)
        if same:
            return
        ps.destroy_model_parallel()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP x PP = {tp} x {pp}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )

"""The Megatron ranks as Ray actors: one actor per rank, started together, called together (SPMD).

Each actor sets the torch.distributed environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) before
building its `MegatronActor`, so megatron-core sees an ordinary torchrun-like world (NCCL on GPUs, gloo on
CPU). Every method call goes to all ranks with the same arguments; the result of rank 0 is returned (all
ranks return the same values: the actor shares log-probs and metrics across the model).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int):
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",  # Ray gives each rank its own GPU (CUDA_VISIBLE_DEVICES): index 0 inside it
        )
        self.actor = None

    def build(self, cfg, hf_dir: str, pad_token_id: int) -> int:
        import torch

        from luffy_megatron.actor.megatron_actor import MegatronActor

        if not torch.cuda.is_available():  # Ray gives CPU-less actors one thread; ranks take turns with the engines
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        if self.actor is None:
            self.actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=pad_token_id)
        return self.actor.step

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.actor, method)(*args, **kwargs)

    def run(self, fn, *args, **kwargs) -> Any:
        """Run `fn(actor, *args, **kwargs)` on this rank (checkpointing, weight sync, ...)."""
        return fn(self.actor, *args, **kwargs)


class ActorGroup:
    """`world_size` Megatron ranks placed by Ray (one GPU each on a cluster, CPU-only here)."""

    def __init__(self, world_size: int, *, use_gpu: bool):
        master_addr = ray.util.get_node_ip_address()
        port = _free_port()
        worker = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0)(_RankWorker)
        self.workers = [worker.remote(r, world_size, master_addr, port) for r in range(world_size)]

    def build(self, cfg, hf_dir: str, pad_token_id: int) -> int:
        return ray.get([w.build.remote(cfg, hf_dir, pad_token_id) for w in self.workers])[0]

    def call(self, method: str, *args, **kwargs) -> Any:
        return ray.get([w.call.remote(method, *args, **kwargs) for w in self.workers])[0]

    def run(self, fn, *args, **kwargs) -> Any:
        return ray.get([w.run.remote(fn, *args, **kwargs) for w in self.workers])[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []

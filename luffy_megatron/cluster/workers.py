"""The running cluster of one job: the granted GPUs (`Placement`), the Megatron ranks (`ActorGroup`) and the
vLLM engines (`rollout.EngineFleet`), with the two switches a colocated step makes and one teardown.

A colocated GPU holds a rank and an engine worker, so a step alternates who owns its memory:

    rollout      engines awake (generate); with actor.offload_during_rollout the optimizer state is on host
    training_phase()   engines sleep (vLLM sleep level 1: weights to host, KV cache dropped), optimizer state back
    training     old log-probs, update
    rollout_phase()    optimizer state to host, engines wake up, then the weight sync into them

Disaggregated and CPU layouts switch nothing (and offload only when asked). On CPU the engines' sleep/wake
are no-ops that still change the engine's state, so a call out of order fails the same way it would on GPUs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SLEEP_LEVEL = 1  # weights to host memory, KV cache dropped: the engine keeps the same model (vLLM's RL setting)


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

    @property
    def colocated(self) -> bool:
        return self.placement.mode == "colocated"

    def training_phase(self) -> dict[str, float]:
        """Before old log-probs and the update. Returns the time of each switch (metrics)."""
        timings: dict[str, float] = {}
        if self.colocated:
            t0 = time.perf_counter()
            self.fleet.sleep(level=SLEEP_LEVEL)
            timings["perf/engine_sleep_s"] = time.perf_counter() - t0
        if self.offload:
            t0 = time.perf_counter()
            self._on_ranks("reload_to_device")
            timings["perf/optimizer_reload_s"] = time.perf_counter() - t0
        return timings

    def rollout_phase(self) -> dict[str, float]:
        """After the update, before the weight sync (the engines must be awake to receive weights)."""
        timings: dict[str, float] = {}
        if self.offload:
            t0 = time.perf_counter()
            self._on_ranks("offload_to_host")
            timings["perf/optimizer_offload_s"] = time.perf_counter() - t0
        if self.colocated:
            t0 = time.perf_counter()
            self.fleet.wake_up()
            timings["perf/engine_wake_s"] = time.perf_counter() - t0
        return timings

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

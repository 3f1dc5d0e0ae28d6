"""The layout on Ray: one placement group per layout node, one bundle per GPU, granted within a deadline.

`reserve(cfg)` resolves `cluster.layout` against the Ray cluster, checks that the GPUs exist (immediately, with
the numbers), picks a Ray node for every layout node, and asks for one ``STRICT_PACK`` placement group per
node, pinned to that node by its ``ray.io/node-id`` label, with a ``{"GPU": 1, "CPU": BUNDLE_CPU}`` bundle per
GPU: bundle i of node n is GPU i of node n in the layout. The wait is bounded by
``cluster.placement_timeout_s``; past it the groups are removed and the error says what was asked and what the
cluster has. Nothing here loads a model, so a placement that cannot be granted fails before any model loads.

Actors then go into their bundles (`Placement.rank_options`, `Placement.engine_launch`): a colocated rank and
its engine worker each take a fraction of the bundle's GPU, so Ray gives both the same ``CUDA_VISIBLE_DEVICES``.
Engines with TP > 1 follow vLLM's supported Ray path (vLLM 0.32 ``RayExecutorV2``): the engine actor itself
holds no GPU and sits in the node's group, vLLM finds the group with ``ray.util.get_current_placement_group()``
and starts one worker per bundle listed in ``VLLM_RAY_BUNDLE_INDICES``, each with ``VLLM_RAY_PER_WORKER_GPUS``
of its GPU (`rollout.ray_engine.VLLMEngineActor` sets both).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from luffy_megatron.cluster.layout import ClusterLayout, plan_layout, resolve_mode
from luffy_megatron.config import Config, ConfigError

log = logging.getLogger(__name__)

BUNDLE_CPU = 0.01  # a token CPU share per GPU bundle; the actors themselves ask for no CPU (they take turns)
NODE_ID_LABEL = "ray.io/node-id"  # Ray's built-in per-node label (ray.util.placement_group.NODE_ID_LABEL_KEY)
PROGRESS_EVERY_S = 30.0


class PlacementError(ConfigError):
    """The Ray cluster cannot host the layout (now or within cluster.placement_timeout_s)."""


@dataclass(frozen=True)
class RayNode:
    node_id: str
    ip: str
    total_gpus: float
    free_gpus: float

    def describe(self) -> str:
        return f"{self.ip} ({self.node_id[:8]}): {self.total_gpus:g} GPUs, {self.free_gpus:g} free"


def cluster_nodes() -> list[RayNode]:
    """The alive Ray nodes with their GPUs (total and currently free), sorted by IP then node id."""
    # lazy: Ray is imported only where the job runs on Ray
    import ray

    try:
        # lazy: Ray is imported only where the job runs on Ray
        from ray._private.state import available_resources_per_node  # what vLLM's ray_utils uses too

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: without it, report totals only
        free = {}
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        total = float(n["Resources"].get("GPU", 0))
        nodes.append(
            RayNode(
                n["NodeID"],
                n["NodeManagerAddress"],
                total,
                float(free.get(n["NodeID"], {}).get("GPU", total if not free else 0)),
            )
        )
    return sorted(nodes, key=lambda x: (_ip_key(x.ip), x.node_id))


def _ip_key(ip: str):
    try:
        return (0, ipaddress.ip_address(ip))
    except ValueError:
        return (1, ip)


def describe_cluster(nodes: list[RayNode]) -> str:
    total = sum(n.total_gpus for n in nodes)
    free = sum(n.free_gpus for n in nodes)
    per_node = "; ".join(n.describe() for n in nodes) or "no alive nodes"
    return f"the Ray cluster has {total:g} GPUs ({free:g} free) on {len(nodes)} node(s): {per_node}"


def _asked(layout: ClusterLayout, cfg: Config) -> str:
    p = cfg.parallel
    if layout.mode == "colocated":
        how = f"colocated: parallel.nnodes={p.nnodes} x parallel.n_gpus_per_node={p.n_gpus_per_node}"
    else:
        rollout = layout.num_gpus - p.world_size
        how = (
            f"disaggregated: parallel.nnodes={p.nnodes} x parallel.n_gpus_per_node={p.n_gpus_per_node} training "
            f"+ {rollout} on cluster.rollout_nnodes={cfg.cluster.rollout_nnodes} node(s) for "
            f"{len(layout.engines)} engine(s) of rollout.tensor_model_parallel_size={layout.engine_tp}"
        )
    need = ", ".join(str(n.num_gpus) for n in layout.nodes)
    return (
        f"the layout asks for {layout.num_gpus} GPUs ({how}) on {len(layout.nodes)} distinct node(s) with [{need}] GPUs"
    )


def choose_nodes(layout: ClusterLayout, nodes: list[RayNode], cfg: Config) -> list[RayNode]:
    """A distinct Ray node for every layout node: nodes with enough free GPUs first, then by IP. Raises
    PlacementError at once when the cluster does not have the GPUs at all (waiting could not help)."""
    total = sum(n.total_gpus for n in nodes)
    if layout.num_gpus > total:
        raise PlacementError(
            f"{_asked(layout, cfg)}, but {describe_cluster(nodes)}; lower parallel.nnodes / "
            "n_gpus_per_node (or cluster.rollout_nnodes), or add nodes"
        )
    chosen: list[RayNode] = []
    for slot in layout.nodes:  # in layout order: node 0 (rank 0) gets the first fitting node by IP
        candidates = [n for n in nodes if n not in chosen and n.total_gpus >= slot.num_gpus]
        if not candidates:
            raise PlacementError(
                f"{_asked(layout, cfg)}, but {describe_cluster(nodes)}: no node left with "
                f"{slot.num_gpus} GPUs for layout node {slot.index}; match parallel.n_gpus_per_node "
                "to the GPUs of your nodes"
            )
        chosen.append(min(candidates, key=lambda n: (n.free_gpus < slot.num_gpus, _ip_key(n.ip), n.node_id)))
    return chosen


def rank_gpu_env(environ) -> dict[str, str]:
    """Environment of a Megatron rank on a GPU: NCCL's NVLink SHARP (NVLS) buffers off unless the user set
    NCCL_NVLS_ENABLE. NVLS adds about 1 GiB per communicator that spans GPUs of one node (NVIDIA/nccl#864),
    and the memory plan, which the recipes are sized by, counts the trainer's communicators without it
    (`perf/runtime_memory.py`; `tools/plan.py --nccl-nvls` plans with it on)."""
    return {"NCCL_NVLS_ENABLE": environ.get("NCCL_NVLS_ENABLE", "0")}


@dataclass
class Placement:
    """The granted GPUs of a layout: `groups[n]` is the placement group of layout node n on `nodes[n]`."""

    layout: ClusterLayout
    groups: list = field(default_factory=list)
    nodes: list[RayNode] = field(default_factory=list)
    wait_s: float = 0.0  # how long Ray took to grant the groups
    timeout_s: float = 600.0  # cluster.placement_timeout_s: also bounds waiting for the actors to start

    @property
    def mode(self) -> str:
        return self.layout.mode

    def _strategy(self, node: int, gpu: int, *, capture_child_tasks: bool = False):
        # lazy: Ray is imported only where the job runs on Ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[node],
            placement_group_bundle_index=gpu,
            placement_group_capture_child_tasks=capture_child_tasks,
        )

    def rank_options(self, rank: int) -> dict[str, Any]:
        """Ray actor options of Megatron rank `rank` (`.options(**...)`)."""
        if not self.layout.uses_gpus:
            return {"num_cpus": 0, "num_gpus": 0}
        slot = self.layout.ranks[rank]
        return {
            "num_cpus": 0,
            "num_gpus": self.layout.rank_gpu_share,
            "scheduling_strategy": self._strategy(slot.node, slot.gpu),
            "runtime_env": {"env_vars": rank_gpu_env(os.environ)},
        }

    def engine_launch(self, index: int) -> dict[str, Any]:
        """How engine `index` starts: Ray actor `options`, and for TP > 1 the bundles of its vLLM workers in the
        actor's placement group (`ray_bundles`) with each worker's GPU share (`worker_gpu_share`)."""
        layout = self.layout
        if not layout.uses_gpus:
            return {"options": {"num_cpus": 0, "num_gpus": 0}, "ray_bundles": None, "worker_gpu_share": None}
        slot = layout.engines[index]
        if layout.engine_tp == 1:  # vLLM runs in the actor itself: the actor holds the GPU share
            return {
                "options": {
                    "num_cpus": 0,
                    "num_gpus": layout.engine_gpu_share,
                    "scheduling_strategy": self._strategy(slot.node, slot.gpus[0]),
                },
                "ray_bundles": None,
                "worker_gpu_share": None,
            }
        # as vLLM's examples/offline_inference/rlhf_colocate.py: the engine actor holds no GPU, its workers do
        return {
            "options": {
                "num_cpus": 0,
                "num_gpus": 0,
                "scheduling_strategy": self._strategy(slot.node, slot.gpus[0], capture_child_tasks=True),
            },
            "ray_bundles": list(slot.gpus),
            "worker_gpu_share": layout.engine_gpu_share,
        }

    def group_id(self, node: int) -> Optional[str]:
        return self.groups[node].id.hex() if self.groups else None

    def describe(self) -> str:
        text = self.layout.describe()
        for i, n in enumerate(self.nodes):
            text += f"\n  node {i} -> Ray node {n.ip} ({n.node_id[:8]})"
        return text

    def release(self) -> None:
        """Removes the placement groups (their actors should be gone first). Safe to call twice."""
        # lazy: Ray is imported only where the job runs on Ray
        from ray.util.placement_group import remove_placement_group

        groups, self.groups = self.groups, []
        for pg in groups:
            try:
                remove_placement_group(pg)
            except Exception as err:  # noqa: BLE001 - the cluster may already be gone
                log.warning("could not remove placement group %s: %s", pg.id.hex(), err)


def reserve(cfg: Config, *, timeout_s: Optional[float] = None) -> Placement:
    """Plans the layout for the connected Ray cluster and reserves its GPUs (see the module docstring)."""
    # lazy: Ray is imported only where the job runs on Ray
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout_s = cfg.cluster.placement_timeout_s if timeout_s is None else timeout_s
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    layout = plan_layout(cfg, resolve_mode(cfg, cluster_has_gpus=has_gpus))
    if not layout.uses_gpus:
        return Placement(layout, timeout_s=timeout_s)
    nodes = cluster_nodes()
    chosen = choose_nodes(layout, nodes, cfg)
    groups = []
    for slot, node in zip(layout.nodes, chosen):
        bundles = [{"GPU": 1.0, "CPU": BUNDLE_CPU} for _ in range(slot.num_gpus)]
        groups.append(
            placement_group(
                bundles,
                strategy="STRICT_PACK",
                name="",
                bundle_label_selector=[{NODE_ID_LABEL: node.node_id}] * slot.num_gpus,
            )
        )
    t0 = time.monotonic()
    pending = {pg.ready(): i for i, pg in enumerate(groups)}
    while pending:
        left = timeout_s - (time.monotonic() - t0)
        if left <= 0:
            break
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(left, PROGRESS_EVERY_S))
        for ref in ready:
            pending.pop(ref)
        if pending and time.monotonic() - t0 < timeout_s:
            log.warning(
                "waiting for GPUs: %d of %d node groups granted after %.0fs (cluster.placement_timeout_s=%g); %s",
                len(groups) - len(pending),
                len(groups),
                time.monotonic() - t0,
                timeout_s,
                describe_cluster(cluster_nodes()),
            )
    if pending:
        waiting = sorted(pending.values())
        for pg in groups:
            remove_placement_group(pg)
        asked = "; ".join(f"node {i}: {layout.nodes[i].num_gpus} GPUs on {chosen[i].ip}" for i in waiting)
        raise PlacementError(
            f"{_asked(layout, cfg)}; after cluster.placement_timeout_s={timeout_s:g}s Ray has not "
            f"granted {asked}. Now {describe_cluster(cluster_nodes())} (ray.available_resources() "
            f"GPU={ray.available_resources().get('GPU', 0):g}). Free the GPUs (other jobs, leftover "
            "actors) or raise cluster.placement_timeout_s"
        )
    placement = Placement(layout, groups, chosen, wait_s=time.monotonic() - t0, timeout_s=timeout_s)
    log.info("placement granted in %.1fs:\n%s", placement.wait_s, placement.describe())
    return placement

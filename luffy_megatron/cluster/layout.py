"""Which GPU of which node hosts which Megatron rank and which vLLM engine, decided from the config alone.

Pure: no Ray, no torch, no model. `plan_layout` runs before anything starts (the trainer's pre-flight, and
`cluster.placement` before it asks Ray for GPUs), so an impossible layout is an error that names the settings
and the numbers instead of a job that hangs on a GPU that will never come.

Node indices are the layout's own (0 = the node of rank 0); `cluster.placement` maps them to Ray nodes.
A "GPU" here is a GPU index on its node, which is also the index of its bundle in that node's placement
group; which physical device it is, Ray decides (and sets `CUDA_VISIBLE_DEVICES` accordingly).

Modes (`cluster.layout`):

* ``colocated`` (what `auto` means when the Ray cluster has GPUs; upstream LUFFY and verl run so): every GPU
  hosts one Megatron rank and a share of one engine. Engine e has ``rollout.tensor_model_parallel_size``
  GPUs: the GPUs of ranks ``e*tp .. e*tp+tp-1``, consecutive ranks of one node. Each rank takes
  `COLOCATED_RANK_GPU_SHARE` of its GPU in Ray's accounting and the engine worker on it the rest, so both
  land in the same bundle and see the same ``CUDA_VISIBLE_DEVICES``.
* ``disaggregated``: ``parallel.nnodes`` training nodes, then ``cluster.rollout_nnodes`` whole rollout nodes
  (``parallel.n_gpus_per_node`` GPUs each) that only generate.
* ``cpu`` (what `auto` means without GPUs): Ray actors that ask for no GPU, as on a CPU machine.

Megatron ranks follow megatron-core's default order ``tp-cp-ep-dp-pp`` (TP fastest) and fill nodes in rank
order, so a TP group is a run of consecutive ranks; it never straddles nodes because TP must divide the GPUs
per node (checked).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from luffy_megatron.config.errors import ConfigError
from luffy_megatron.config.sections import Config

Mode = Literal["cpu", "colocated", "disaggregated"]

# Ray's accounting of a colocated GPU: the rank actor and the engine (or its vLLM TP worker) share the bundle.
COLOCATED_RANK_GPU_SHARE = 0.5
COLOCATED_ENGINE_GPU_SHARE = 1.0 - COLOCATED_RANK_GPU_SHARE


@dataclass(frozen=True)
class RankSlot:
    """One Megatron rank: where it runs and its coordinates in megatron-core's groups."""

    rank: int
    node: int  # layout node index
    gpu: Optional[int]  # GPU index on that node (its bundle); None in cpu mode
    tp_rank: int
    cp_rank: int
    dp_rank: int
    pp_rank: int


@dataclass(frozen=True)
class EngineSlot:
    """One vLLM engine: its node and the GPUs of its TP workers (worker i on gpus[i])."""

    index: int
    node: int
    gpus: tuple[int, ...]  # () in cpu mode
    ranks: tuple[int, ...]  # colocated: the Megatron ranks on those GPUs; () otherwise


@dataclass(frozen=True)
class NodeSlot:
    index: int
    num_gpus: int  # GPUs this layout uses on the node
    role: Literal["train", "rollout", "train+rollout", "cpu"]


@dataclass(frozen=True)
class ClusterLayout:
    mode: Mode
    gpus_per_node: int
    nodes: tuple[NodeSlot, ...]
    ranks: tuple[RankSlot, ...]
    engines: tuple[EngineSlot, ...]
    engine_tp: int
    rank_gpu_share: float  # num_gpus of each rank actor in its bundle (0 in cpu mode)
    engine_gpu_share: float  # num_gpus of each engine TP worker in its bundle (0 in cpu mode)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def num_gpus(self) -> int:
        return sum(n.num_gpus for n in self.nodes)

    @property
    def uses_gpus(self) -> bool:
        return self.mode != "cpu"

    def describe(self) -> str:
        """A few lines a user can read: which node does what."""
        if self.mode == "cpu":
            return (
                f"cpu layout: {self.world_size} Megatron ranks and {len(self.engines)} engine(s) of TP "
                f"{self.engine_tp} as Ray actors without GPUs"
            )
        lines = [
            f"{self.mode} layout: {self.num_gpus} GPUs on {len(self.nodes)} node(s) of {self.gpus_per_node}; "
            f"{self.world_size} Megatron ranks, {len(self.engines)} engine(s) of TP {self.engine_tp}"
        ]
        for node in self.nodes:
            ranks = [r.rank for r in self.ranks if r.node == node.index]
            engines = [e.index for e in self.engines if e.node == node.index]
            lines.append(
                f"  node {node.index} ({node.role}, {node.num_gpus} GPUs): ranks {_span(ranks)}, "
                f"engines {_span(engines)}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _span(ids: list[int]) -> str:
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def overlap_problem(cfg: Config, mode: str) -> Optional[str]:
    """Why trainer.overlap cannot run in layout `mode` (None when it can): one_step has the engines generate
    while the trainer computes, which colocated engines cannot (they sleep while the ranks use the GPUs)."""
    if cfg.trainer.overlap == "one_step" and mode == "colocated":
        how = " (cluster.layout=auto is colocated on GPUs)" if cfg.cluster.layout == "auto" else ""
        return (
            f"trainer.overlap=one_step generates the next batch while the trainer updates, but cluster.layout="
            f"{cfg.cluster.layout}{how} puts the engines on the trainer's GPUs; set cluster.layout=disaggregated "
            "(engines on nodes of their own, cluster.rollout_nnodes) or trainer.overlap=none"
        )
    return None


def resolve_mode(cfg: Config, *, cluster_has_gpus: bool) -> Mode:
    """`cluster.layout` with `auto` resolved: colocated when the Ray cluster has GPUs, cpu otherwise. A layout
    that cannot run trainer.overlap is refused (`overlap_problem`)."""
    layout = cfg.cluster.layout
    if layout == "auto":
        mode = "colocated" if cluster_has_gpus else "cpu"
        problem = overlap_problem(cfg, mode)
        if problem:
            raise ConfigError(problem)
        return mode
    if not cluster_has_gpus:
        raise ConfigError(
            f"cluster.layout={layout} places the ranks and engines on GPUs, but the Ray cluster has "
            "no GPUs; use cluster.layout=auto (plain CPU actors) or start Ray with GPUs"
        )
    return layout  # type: ignore[return-value]


def megatron_coordinates(rank: int, *, tp: int, cp: int, dp: int, pp: int) -> tuple[int, int, int, int]:
    """(tp_rank, cp_rank, dp_rank, pp_rank) of a global rank in megatron-core's order "tp-cp-ep-dp-pp"
    (the first fastest; expert parallelism is 1 for the dense models trained here)."""
    tp_rank, rest = rank % tp, rank // tp
    cp_rank, rest = rest % cp, rest // cp
    dp_rank, pp_rank = rest % dp, rest // dp
    assert pp_rank < pp, (rank, tp, cp, dp, pp)
    return tp_rank, cp_rank, dp_rank, pp_rank


def layout_problems(cfg: Config, mode: Mode) -> list[str]:
    """Why the ranks and engines of `cfg` cannot be placed in GPU mode `mode` (empty when they can). Also used by
    `config.checks` for an explicit `cluster.layout`."""
    p, r = cfg.parallel, cfg.rollout
    tp, world, gpn, etp = p.tensor_model_parallel_size, p.world_size, p.n_gpus_per_node, r.tensor_model_parallel_size
    if min(tp, gpn, etp, p.nnodes) < 1:
        return []  # the config's own checks report the sizes themselves
    errors: list[str] = []
    if gpn % tp:
        errors.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide parallel.n_gpus_per_node={gpn}: "
            "a tensor-parallel group would straddle two nodes; pick a TP that divides the GPUs per node"
        )
    if etp > gpn:
        errors.append(
            f"rollout.tensor_model_parallel_size={etp} is larger than parallel.n_gpus_per_node={gpn}: an "
            "engine's tensor-parallel workers must share one node"
        )
    if mode == "colocated":
        if cfg.cluster.rollout_nnodes:
            errors.append(
                f"cluster.rollout_nnodes={cfg.cluster.rollout_nnodes} is for cluster.layout=disaggregated; "
                "colocated engines share the training GPUs (set it to 0)"
            )
        if etp <= gpn and gpn % etp:
            errors.append(
                f"rollout.tensor_model_parallel_size={etp} does not divide parallel.n_gpus_per_node={gpn}: "
                "colocated engines must tile each node's GPUs exactly"
            )
        if r.num_engines is not None and r.num_engines * etp != world:
            fit = f"{world // etp} or null" if world % etp == 0 else "null"
            errors.append(
                f"colocated engines must exactly cover the trainer's GPUs: rollout.num_engines={r.num_engines} "
                f"x rollout.tensor_model_parallel_size={etp} = {r.num_engines * etp} GPUs, but the trainer "
                f"has {world} (parallel.nnodes={p.nnodes} x n_gpus_per_node={gpn}); set rollout.num_engines={fit}"
            )
    elif mode == "disaggregated":
        if cfg.cluster.rollout_nnodes < 1:
            errors.append(
                "cluster.layout=disaggregated needs cluster.rollout_nnodes >= 1 (whole nodes that only "
                f"generate); got {cfg.cluster.rollout_nnodes}"
            )
        capacity = cfg.cluster.rollout_nnodes * (gpn // etp) if etp <= gpn else 0
        if r.num_engines is not None and etp <= gpn and r.num_engines > capacity:
            errors.append(
                f"rollout.num_engines={r.num_engines} engines of rollout.tensor_model_parallel_size={etp} do "
                f"not fit on cluster.rollout_nnodes={cfg.cluster.rollout_nnodes} node(s) of {gpn} GPUs "
                f"(at most {capacity})"
            )
    else:
        raise ValueError(f"unknown GPU layout mode {mode!r}")
    return errors


def problems_error(errors: list[str]) -> ConfigError:
    """One ConfigError for a non-empty list of problems: the problem itself, or "N problems:" and a line each."""
    if len(errors) == 1:
        return ConfigError(errors[0])
    return ConfigError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))


def plan_layout(cfg: Config, mode: Mode) -> ClusterLayout:
    """The layout of `cfg` in `mode` (see `resolve_mode`). Raises ConfigError naming the settings when the
    ranks or engines cannot be placed as the mode requires."""
    p, r = cfg.parallel, cfg.rollout
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    world, gpn, etp = p.world_size, p.n_gpus_per_node, r.tensor_model_parallel_size
    world_size_problem = p.world_size_problem()
    if world_size_problem:
        raise ConfigError(world_size_problem)
    dp = world // (tp * pp * cp)

    def coords(rank: int) -> tuple[int, int, int, int]:
        return megatron_coordinates(rank, tp=tp, cp=cp, dp=dp, pp=pp)

    if mode == "cpu":
        ranks = tuple(RankSlot(rank, 0, None, *coords(rank)) for rank in range(world))
        num_engines = r.num_engines or 1
        engines = tuple(EngineSlot(e, 0, (), ()) for e in range(num_engines))
        return ClusterLayout("cpu", gpn, (NodeSlot(0, 0, "cpu"),), ranks, engines, etp, 0.0, 0.0)

    errors = layout_problems(cfg, mode)
    if errors:
        raise problems_error(errors)

    ranks = tuple(RankSlot(rank, rank // gpn, rank % gpn, *coords(rank)) for rank in range(world))
    if mode == "colocated":
        nodes = tuple(NodeSlot(n, gpn, "train+rollout") for n in range(p.nnodes))
        engines = tuple(
            EngineSlot(
                e,
                (e * etp) // gpn,
                tuple((e * etp + i) % gpn for i in range(etp)),
                tuple(range(e * etp, (e + 1) * etp)),
            )
            for e in range(world // etp)
        )
        return ClusterLayout(
            mode, gpn, nodes, ranks, engines, etp, COLOCATED_RANK_GPU_SHARE, COLOCATED_ENGINE_GPU_SHARE
        )

    per_node = gpn // etp
    num_engines = r.num_engines if r.num_engines is not None else cfg.cluster.rollout_nnodes * per_node
    nodes = tuple(NodeSlot(n, gpn, "train") for n in range(p.nnodes))
    rollout_gpus = [0] * cfg.cluster.rollout_nnodes
    engines_list = []
    for e in range(num_engines):
        k, slot = divmod(e, per_node)
        engines_list.append(EngineSlot(e, p.nnodes + k, tuple(slot * etp + i for i in range(etp)), ()))
        rollout_gpus[k] = (slot + 1) * etp
    # Rollout nodes are whole nodes in the pool; only the GPUs the engines use are reserved.
    nodes += tuple(
        NodeSlot(p.nnodes + k, rollout_gpus[k], "rollout") for k in range(cfg.cluster.rollout_nnodes) if rollout_gpus[k]
    )
    return ClusterLayout(mode, gpn, nodes, ranks, tuple(engines_list), etp, 1.0, 1.0)


# ------------------------------------------------------------------------------------- model vs parallelism


def read_model_config(model_dir: str | os.PathLike) -> Optional[dict]:
    """The HF config.json of `model.path`, or None when the path has none (yet: tools may build it later)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.path={model_dir}: config.json is not valid JSON: {err}") from None


def check_model_weights(model_dir: str | os.PathLike) -> None:
    """The weight files of the HF model in `model_dir` (model.path) are there and not empty: the engines and the
    ranks load them only after the cluster is up, which on a large job is minutes later. A ConfigError names
    the missing or empty files."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ConfigError(f"model.path={model_dir}: {index.name} is not a safetensors index ({err})") from None
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(
            f"model.path={model_dir} has a config.json but no weights (model.safetensors or "
            "model.safetensors.index.json): copy the whole HF model directory"
        )
    bad = [f for f in files if not (model_dir / f).is_file() or (model_dir / f).stat().st_size == 0]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(
            f"model.path={model_dir}: {len(bad)} of the {len(files)} weight files its index names are missing "
            f"or empty: {shown}; copy (or download) the whole HF model directory again"
        )


def check_model_parallelism(cfg: Config, hf_config: Mapping[str, Any]) -> None:
    """`model_parallelism_problems` as one ConfigError, when there are any."""
    errors = model_parallelism_problems(cfg, hf_config)
    if errors:
        raise problems_error(errors)


def model_parallelism_problems(cfg: Config, hf_config: Mapping[str, Any]) -> list[str]:
    """Trainer TP/PP and engine TP against the model's heads, query groups and layers (megatron-core's and vLLM's
    own rules), so a bad combination fails at config load instead of inside every rank. Empty when they fit."""
    p, etp = cfg.parallel, cfg.rollout.tensor_model_parallel_size
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    heads = hf_config.get("num_attention_heads")
    groups = hf_config.get("num_key_value_heads") or heads
    layers = hf_config.get("num_hidden_layers")
    where = f"model.path={cfg.model.path}"
    errors = []
    if heads:
        if heads % tp:
            errors.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the model's {heads} attention heads "
                f"({where}); megatron-core splits heads evenly over TP ranks"
            )
        if groups % tp:
            errors.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the model's {groups} query groups "
                f"(num_key_value_heads, {where}); megatron-core needs num_query_groups % TP == 0"
            )
        if heads % etp:
            errors.append(
                f"rollout.tensor_model_parallel_size={etp} does not divide the model's {heads} attention heads "
                f"({where}); vLLM needs num_attention_heads % TP == 0"
            )
        # vLLM (QKVParallelLinear, seen in 0.32) shards KV heads when TP < KV heads, replicates them when
        # TP >= KV heads.
        if etp < groups and groups % etp:
            errors.append(
                f"rollout.tensor_model_parallel_size={etp} does not divide the model's {groups} KV heads "
                f"({where}); vLLM shards KV heads evenly when TP is smaller than their number"
            )
        if etp >= groups and etp % groups:
            errors.append(
                f"rollout.tensor_model_parallel_size={etp} is not a multiple of the model's {groups} KV heads "
                f"({where}); vLLM replicates KV heads only by a whole factor when TP exceeds them"
            )
    ffn = hf_config.get("intermediate_size")
    if ffn and ffn % tp:
        errors.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide the model's intermediate_size={ffn} "
            f"({where}); megatron-core splits the MLP evenly over TP ranks"
        )
    if layers and layers % pp:
        errors.append(
            f"parallel.pipeline_model_parallel_size={pp} does not divide the model's {layers} layers ({where})"
        )
    elif layers and vpp and (layers // pp) % vpp:
        errors.append(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} does not divide the {layers // pp} layers "
            f"of each pipeline stage ({where})"
        )
    elif layers and cfg.model.recompute_granularity == "full":
        # megatron-core's TransformerBlock._checkpointed_forward (0.16.1) walks each model chunk's layers in units of
        # recompute_num_layers (uniform; a last unit past the end fails) or recomputes the first n (block)
        per_chunk, n = layers // (pp * (vpp or 1)), cfg.model.recompute_num_layers
        if cfg.model.recompute_method == "uniform" and per_chunk % n:
            errors.append(
                f"model.recompute_num_layers={n} does not divide the {per_chunk} layers of each model chunk "
                f"({where}); with model.recompute_method=uniform choose a divisor (1 recomputes every layer)"
            )
        if cfg.model.recompute_method == "block" and n > per_chunk:
            errors.append(
                f"model.recompute_num_layers={n} exceeds the {per_chunk} layers of each model chunk ({where}) "
                "(model.recompute_method=block recomputes the first n of them)"
            )
    return errors


def preflight(cfg: Config) -> Optional[ClusterLayout]:
    """Everything that can be checked before Ray starts: the model's heads against TP (when `model.path` has a
    config.json) and, for an explicit `cluster.layout`, the layout itself. Returns that layout (None for auto)."""
    hf_config = read_model_config(cfg.model.path) if cfg.model.path else None
    if hf_config is not None:
        check_model_parallelism(cfg, hf_config)
        check_model_weights(cfg.model.path)
    if cfg.cluster.layout == "auto":
        return None
    return plan_layout(cfg, cfg.cluster.layout)

"""The cluster layout (luffy_megatron/cluster/layout.py) and the checks before start: pure, no Ray, no model."""

from __future__ import annotations

import json

import pytest

from luffy_megatron.cluster.layout import (
    check_model_parallelism,
    megatron_coordinates,
    model_parallelism_problems,
    plan_layout,
    preflight,
    resolve_mode,
)
from luffy_megatron.cluster.placement import PlacementError, RayNode, choose_nodes
from luffy_megatron.config import ConfigError, load_config
from tests.helpers import tp_groups


def cfg_of(*overrides: str):
    return load_config(None, list(overrides))


def _sizes(nnodes, gpn, tp=1, pp=1, cp=1, etp=1, *extra):
    return [
        f"parallel.nnodes={nnodes}",
        f"parallel.n_gpus_per_node={gpn}",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.context_parallel_size={cp}",
        f"rollout.tensor_model_parallel_size={etp}",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------- colocated


def test_colocated_every_gpu_hosts_one_rank_and_one_engine_share():
    layout = plan_layout(cfg_of(*_sizes(2, 4, tp=2, etp=2)), "colocated")
    assert layout.mode == "colocated" and layout.world_size == 8 and layout.num_gpus == 8
    assert [(r.node, r.gpu) for r in layout.ranks] == [(n, g) for n in range(2) for g in range(4)]
    # two engines per node, each on the GPUs of two consecutive ranks of one node
    assert [(e.node, e.gpus, e.ranks) for e in layout.engines] == [
        (0, (0, 1), (0, 1)),
        (0, (2, 3), (2, 3)),
        (1, (0, 1), (4, 5)),
        (1, (2, 3), (6, 7)),
    ]
    for e in layout.engines:
        assert [(layout.ranks[r].node, layout.ranks[r].gpu) for r in e.ranks] == [(e.node, g) for g in e.gpus]
    covered = sorted((e.node, g) for e in layout.engines for g in e.gpus)
    assert covered == sorted((r.node, r.gpu) for r in layout.ranks)  # every GPU exactly once
    assert layout.rank_gpu_share + layout.engine_gpu_share == 1.0 and 0 < layout.rank_gpu_share < 1
    assert "node 1 (train+rollout, 4 GPUs): ranks 4-7, engines 2,3" in layout.describe()


def test_tp_groups_are_megatron_cores_and_never_straddle_nodes():
    from megatron.core.parallel_state import RankGenerator

    for nnodes, gpn, tp, pp, cp in [
        (2, 8, 2, 2, 2),
        (2, 8, 4, 1, 1),
        (4, 4, 2, 2, 1),
        (2, 4, 1, 2, 2),
        (1, 8, 8, 1, 1),
    ]:
        cfg = cfg_of(*_sizes(nnodes, gpn, tp, pp, cp))
        layout = plan_layout(cfg, "colocated")
        dp = layout.world_size // (tp * pp * cp)
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for name, index in (("tp", 0), ("cp", 1), ("dp", 2), ("pp", 3)):
            for group in gen.get_ranks(name):
                coords = [megatron_coordinates(r, tp=tp, cp=cp, dp=dp, pp=pp) for r in group]
                others = {c[:index] + c[index + 1 :] for c in coords}
                assert len(others) == 1, (name, group, coords)  # a group differs only in its own coordinate
                assert sorted(c[index] for c in coords) == list(range(len(group)))
        assert tp_groups(layout) == sorted(gen.get_ranks("tp"))
        for group in tp_groups(layout):
            assert len({layout.ranks[r].node for r in group}) == 1, group
        for r in layout.ranks:
            assert (r.tp_rank, r.cp_rank, r.dp_rank, r.pp_rank) == megatron_coordinates(
                r.rank, tp=tp, cp=cp, dp=dp, pp=pp
            )


def test_colocated_refusals_name_the_settings_and_numbers():
    with pytest.raises(
        ConfigError, match=r"tensor_model_parallel_size=4 does not divide parallel.n_gpus_per_node=6.*straddle"
    ):
        plan_layout(cfg_of(*_sizes(2, 6, tp=4, etp=2)), "colocated")
    with pytest.raises(
        ConfigError, match=r"rollout.tensor_model_parallel_size=8 is larger than parallel.n_gpus_per_node=4"
    ):
        plan_layout(cfg_of(*_sizes(2, 4, etp=8)), "colocated")
    with pytest.raises(
        ConfigError,
        match=r"exactly cover.*rollout.num_engines=3 x rollout.tensor_model_parallel_size=2 = 6 "
        r"GPUs, but the trainer has 8.*set rollout.num_engines=4 or null",
    ):
        plan_layout(cfg_of(*_sizes(2, 4, etp=2), "rollout.num_engines=3"), "colocated")
    with pytest.raises(
        ConfigError, match=r"rollout.tensor_model_parallel_size=3 does not divide parallel.n_gpus_per_node=4.*tile"
    ):
        plan_layout(cfg_of(*_sizes(3, 4, etp=3)), "colocated")
    # the same rules fail at config load when the layout is explicit
    with pytest.raises(ConfigError, match="exactly cover"):
        load_config(None, _sizes(2, 4, etp=2) + ["rollout.num_engines=3", "cluster.layout=colocated"])
    with pytest.raises(ConfigError, match="straddle"):
        load_config(None, _sizes(2, 6, tp=4) + ["cluster.layout=disaggregated", "cluster.rollout_nnodes=1"])


def test_colocated_engine_tp_that_tiles_the_node_but_not_the_heads_is_fine_here():
    layout = plan_layout(cfg_of(*_sizes(1, 6, etp=3)), "colocated")
    assert [e.gpus for e in layout.engines] == [(0, 1, 2), (3, 4, 5)]


# -------------------------------------------------------------------------------------------- disaggregated


def test_disaggregated_training_nodes_then_whole_rollout_nodes():
    cfg = cfg_of(*_sizes(1, 4, tp=2, etp=2), "cluster.layout=disaggregated", "cluster.rollout_nnodes=1")
    layout = plan_layout(cfg, "disaggregated")
    assert [(n.index, n.role, n.num_gpus) for n in layout.nodes] == [(0, "train", 4), (1, "rollout", 4)]
    assert {r.node for r in layout.ranks} == {0}
    assert [(e.node, e.gpus, e.ranks) for e in layout.engines] == [(1, (0, 1), ()), (1, (2, 3), ())]
    assert layout.rank_gpu_share == layout.engine_gpu_share == 1.0
    two = plan_layout(
        cfg_of(*_sizes(2, 4, tp=2, etp=4), "cluster.layout=disaggregated", "cluster.rollout_nnodes=2"), "disaggregated"
    )
    assert [(e.node, e.gpus) for e in two.engines] == [(2, (0, 1, 2, 3)), (3, (0, 1, 2, 3))]


def test_disaggregated_reserves_only_the_gpus_its_engines_use():
    cfg = cfg_of(
        *_sizes(1, 4, etp=2), "cluster.layout=disaggregated", "cluster.rollout_nnodes=1", "rollout.num_engines=1"
    )
    layout = plan_layout(cfg, "disaggregated")
    assert [(n.role, n.num_gpus) for n in layout.nodes] == [("train", 4), ("rollout", 2)] and layout.num_gpus == 6
    with pytest.raises(
        ConfigError,
        match=r"rollout.num_engines=3 .* do not fit on cluster.rollout_nnodes=1 node\(s\) of 4 GPUs \(at most 2\)",
    ):
        load_config(
            None,
            _sizes(1, 4, etp=2) + ["cluster.layout=disaggregated", "cluster.rollout_nnodes=1", "rollout.num_engines=3"],
        )


def test_cluster_settings_are_validated_at_config_load():
    with pytest.raises(ConfigError, match="disaggregated needs cluster.rollout_nnodes >= 1"):
        load_config(None, ["cluster.layout=disaggregated"])
    with pytest.raises(
        ConfigError, match="cluster.rollout_nnodes=2 gives whole nodes.*set cluster.layout=disaggregated"
    ):
        load_config(None, ["cluster.rollout_nnodes=2"])
    with pytest.raises(ConfigError, match="cluster.rollout_nnodes=1 is for cluster.layout=disaggregated"):
        load_config(None, ["cluster.layout=colocated", "cluster.rollout_nnodes=1"])
    with pytest.raises(
        ConfigError, match="offload_during_rollout=true frees the training GPUs.*cluster.layout=disaggregated"
    ):
        load_config(
            None, ["cluster.layout=disaggregated", "cluster.rollout_nnodes=1", "actor.offload_during_rollout=true"]
        )
    with pytest.raises(ConfigError, match="cluster.placement_timeout_s=0.0 must be > 0"):
        load_config(None, ["cluster.placement_timeout_s=0"])


# ------------------------------------------------------------------------------------------------ cpu / auto


def test_auto_is_colocated_with_gpus_and_plain_cpu_actors_without():
    cfg = cfg_of("parallel.n_gpus_per_node=2")
    assert resolve_mode(cfg, cluster_has_gpus=True) == "colocated"
    assert resolve_mode(cfg, cluster_has_gpus=False) == "cpu"
    cpu = plan_layout(cfg, "cpu")
    assert cpu.uses_gpus is False and cpu.world_size == 2 and len(cpu.engines) == 1
    assert {(r.node, r.gpu) for r in cpu.ranks} == {(0, None)} and cpu.rank_gpu_share == cpu.engine_gpu_share == 0
    assert len(plan_layout(cfg_of("parallel.n_gpus_per_node=2", "rollout.num_engines=2"), "cpu").engines) == 2
    for layout in ("colocated", "disaggregated"):
        explicit = cfg_of(
            f"cluster.layout={layout}", *(["cluster.rollout_nnodes=1"] if layout == "disaggregated" else [])
        )
        with pytest.raises(ConfigError, match=f"cluster.layout={layout} places .* no GPUs"):
            resolve_mode(explicit, cluster_has_gpus=False)


# ------------------------------------------------------------------------------------- model vs parallelism

HEADS = {"num_attention_heads": 12, "num_key_value_heads": 4, "num_hidden_layers": 8}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.n_gpus_per_node=8", "parallel.tensor_model_parallel_size=8"],
            r"tensor_model_parallel_size=8 does not divide the model's 12 attention heads",
        ),
        (
            [
                "parallel.tensor_model_parallel_size=8",
                "parallel.n_gpus_per_node=8",
                "rollout.tensor_model_parallel_size=4",
            ],
            r"does not divide the model's 4 query groups",
        ),
        (
            ["rollout.tensor_model_parallel_size=8", "parallel.n_gpus_per_node=8"],
            r"rollout.tensor_model_parallel_size=8 does not divide the model's 12 attention heads",
        ),
        (
            ["rollout.tensor_model_parallel_size=6", "parallel.n_gpus_per_node=6"],
            r"rollout.tensor_model_parallel_size=6 is not a multiple of the model's 4 KV heads",
        ),
        (
            [
                "parallel.n_gpus_per_node=3",
                "parallel.pipeline_model_parallel_size=3",
                "rollout.tensor_model_parallel_size=1",
            ],
            r"pipeline_model_parallel_size=3 does not divide the model's 8 layers",
        ),
    ],
)
def test_tp_against_heads_and_query_groups(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_model_parallelism(cfg_of(*overrides), HEADS)


def test_model_parallelism_problems_are_a_list_the_check_raises_as_one_error():
    """Each problem is its own item (no message text to parse back); the raising check joins them."""
    cfg = cfg_of(
        "parallel.n_gpus_per_node=8", "parallel.tensor_model_parallel_size=8", "rollout.tensor_model_parallel_size=4"
    )
    problems = model_parallelism_problems(cfg, HEADS)
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert "12 attention heads" in problems[0] and "4 query groups" in problems[1]
    with pytest.raises(ConfigError) as err:
        check_model_parallelism(cfg, HEADS)
    assert str(err.value) == "2 problems:\n" + "\n".join(f"  - {p}" for p in problems)
    assert (
        model_parallelism_problems(
            cfg_of(
                "parallel.n_gpus_per_node=4",
                "parallel.tensor_model_parallel_size=4",
                "rollout.tensor_model_parallel_size=4",
            ),
            HEADS,
        )
        == []
    )


def test_tp_that_fits_the_heads_passes_including_vllm_kv_replication():
    for overrides in (
        ["parallel.n_gpus_per_node=4", "parallel.tensor_model_parallel_size=4", "rollout.tensor_model_parallel_size=4"],
        ["parallel.n_gpus_per_node=2", "parallel.tensor_model_parallel_size=2", "rollout.tensor_model_parallel_size=2"],
    ):
        check_model_parallelism(cfg_of(*overrides), HEADS)
    # vLLM replicates KV heads when its TP is a multiple of them: 2 KV heads at engine TP 4 is fine
    check_model_parallelism(
        cfg_of("rollout.tensor_model_parallel_size=4", "parallel.n_gpus_per_node=4"),
        {"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2},
    )


def test_bad_tp_fails_at_start_before_ray_or_data(tmp_path, capsys):
    """luffy-train with a TP that does not divide the model's heads: exit 2 with the message, and neither Ray
    nor the (missing) data files were touched."""
    import ray

    from luffy_megatron.train.loop import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **HEADS}))
    assert not ray.is_initialized()
    code = main(
        [
            "--set",
            f"model.path={tmp_path}",
            "--set",
            "parallel.n_gpus_per_node=8",
            "--set",
            "parallel.tensor_model_parallel_size=8",
            "--set",
            "data.train_files=[/nonexistent.parquet]",
            "--set",
            f"trainer.output_dir={tmp_path / 'out'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "parallel.tensor_model_parallel_size=8 does not divide the model's 12 attention heads" in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_preflight_plans_explicit_layouts_and_skips_auto(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HEADS))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    auto = cfg_of(f"model.path={tmp_path}", "parallel.n_gpus_per_node=4", "rollout.tensor_model_parallel_size=2")
    assert preflight(auto) is None
    colocated = cfg_of(
        f"model.path={tmp_path}",
        "parallel.n_gpus_per_node=4",
        "rollout.tensor_model_parallel_size=2",
        "cluster.layout=colocated",
    )
    assert len(preflight(colocated).engines) == 2
    assert preflight(cfg_of("model.path=/nonexistent/model")) is None  # no config.json yet: nothing to check


# --------------------------------------------------------------------------------- Ray nodes for the layout


def test_choose_nodes_fails_at_once_without_the_gpus_and_prefers_free_nodes():
    cfg = cfg_of(*_sizes(2, 4))
    layout = plan_layout(cfg, "colocated")
    nodes = [
        RayNode("b" * 56, "10.0.0.2", 4, 4),
        RayNode("a" * 56, "10.0.0.1", 4, 0),
        RayNode("c" * 56, "10.0.0.3", 4, 4),
    ]
    chosen = choose_nodes(layout, sorted(nodes, key=lambda n: n.ip), cfg)
    assert [n.ip for n in chosen] == ["10.0.0.2", "10.0.0.3"]  # the busy 10.0.0.1 last
    with pytest.raises(
        PlacementError,
        match=r"asks for 8 GPUs \(colocated: parallel.nnodes=2 x parallel.n_gpus_per_node=4\).*"
        r"the Ray cluster has 4 GPUs \(4 free\) on 1 node",
    ):
        choose_nodes(layout, [nodes[0]], cfg)
    with pytest.raises(PlacementError, match="no node left with 4 GPUs for layout node 1"):
        choose_nodes(layout, [RayNode("x" * 56, "10.0.0.9", 8, 8)], cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.recompute_granularity=full", "model.recompute_num_layers=3"],
            "recompute_num_layers=3 does not divide the 4 layers",
        ),
        (
            ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=5"],
            "recompute_num_layers=5 exceeds the 4 layers",
        ),
        (
            [
                "parallel.n_gpus_per_node=4",
                "parallel.tensor_model_parallel_size=4",
                "rollout.tensor_model_parallel_size=1",
            ],
            "does not divide the model's intermediate_size=6",
        ),
    ],
)
def test_recompute_units_and_mlp_split_against_the_model(overrides, message):
    arch = {"num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 4, "intermediate_size": 6}
    with pytest.raises(ConfigError, match=message):
        check_model_parallelism(cfg_of(*overrides), arch)
    check_model_parallelism(cfg_of("model.recompute_granularity=full", "model.recompute_num_layers=2"), arch)


def test_preflight_names_missing_or_empty_weight_files_before_ray(tmp_path):
    """A model directory copied in part fails at start with the files named, not minutes later on every rank."""
    (tmp_path / "config.json").write_text(json.dumps(HEADS))
    cfg = cfg_of(f"model.path={tmp_path}", "parallel.n_gpus_per_node=4", "rollout.tensor_model_parallel_size=2")
    with pytest.raises(ConfigError, match=r"has a config.json but no weights \(model.safetensors or"):
        preflight(cfg)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = {"weight_map": {"a": shards[0], "b": shards[1], "c": shards[2], "d": shards[0]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / shards[0]).write_bytes(b"weights")
    (tmp_path / shards[1]).write_bytes(b"")  # a copy cut short
    with pytest.raises(ConfigError) as bad:
        preflight(cfg)
    assert str(bad.value) == (
        f"model.path={tmp_path}: 2 of the 3 weight files its index names are missing or empty: "
        f"{shards[1]}, {shards[2]}; copy (or download) the whole HF model directory again"
    )
    (tmp_path / shards[1]).write_bytes(b"weights")
    (tmp_path / shards[2]).write_bytes(b"weights")
    assert preflight(cfg) is None

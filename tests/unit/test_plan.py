"""tools/plan.py: its parameter counts and state bytes against a real megatron-core model and actor, the shipped
GPU recipes fit (their output is snapshotted for docs/cluster.md), refusals name the largest term, errors name the
setting."""

import difflib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.models.hf_to_mcore import padded_vocab_size
from luffy_megatron.perf.flops import TrainerStateBytes, param_counts, resolve_arch, trainer_state_bytes
from luffy_megatron.perf.memory_plan import GIB, Assumptions, make_plan
from luffy_megatron.perf.report import format_plan
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.tiny_models import make_tiny_model
from tests.helpers import REPO
from tools.plan import main as plan_main

SNAPSHOT = Path(__file__).with_name("plan_recipes.snapshot")
GPU_RECIPES = [
    ("recipes/luffy_main.yaml", 8),
    ("recipes/luffy_14b_16node.yaml", 16),
    ("recipes/luffy_32b_16node.yaml", 16),
    ("recipes/luffy_qwen3_8b_8node.yaml", 8),
]


def run_cli(args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def in_clean_checkout(tmp_path, monkeypatch):
    """Run from a directory holding only recipes/ (no models/): the output does not depend on which models
    this checkout happens to have."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = plan_main(list(args))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- (a) counts and bytes against megatron-core ----------------------------------------------------------------


@pytest.mark.parametrize("name, dtype", [("qwen2", "fp32"), ("qwen2_tied", "fp32"), ("qwen2", "bf16")])
def test_params_and_state_bytes_match_a_real_actor(name, dtype, tmp_path):
    """A MegatronActor (local spec, no distributed optimizer, world of one) after one update: its parameter
    count, weight and grad-buffer bytes and the optimizer's state bytes are what the plan says (bf16: megatron's
    Float16OptimizerWithFloat16Params with its fp32 main params; fp32: FP32Optimizer on the model's params)."""
    from luffy_megatron.actor.megatron_actor import MegatronActor

    hf_dir = make_tiny_model(name, tmp_path / name)
    cfg = load_config(None, actor_overrides(world=1) + [f"model.path={hf_dir}", f"model.dtype={dtype}"])
    arch, source = resolve_arch(cfg.model.path)
    assert source == f"read from {hf_dir / 'config.json'}"
    actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
    batch = make_batch(vocab=arch.vocab_size)
    old_lp, _ = actor.compute_log_probs(batch)
    actor.update(batch, advantages=reference_advantages(batch), old_log_probs=old_lp)

    model_params = [p for m in actor.model for p in m.parameters()]
    model_ptrs = {p.data_ptr() for p in model_params}
    grad_buffer = sum(
        b.grad_data.numel() * b.grad_data.element_size()
        for m in actor.model
        for b in (*m.buffers, *m.expert_parallel_buffers)
    )
    moments = main_params = 0
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        for state in opt.optimizer.state.values():
            # torch AdamW's per-parameter `step` counters (0-dim) are not modeled
            moments += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
        for group in opt.optimizer.param_groups:  # main params the optimizer steps that are not the model's
            main_params += sum(p.numel() * p.element_size() for p in group["params"] if p.data_ptr() not in model_ptrs)
    assert moments > 0 and grad_buffer > 0

    plan = make_plan(cfg)
    counts = param_counts(arch, tp=1, pp=1, vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    assert counts.total == counts.per_rank_max == sum(p.numel() for p in model_params)
    assert plan.params == counts
    update = plan.phase("update")
    assert update.get("weights") == sum(p.numel() * p.element_size() for p in model_params)
    assert update.get("grads") == grad_buffer
    assert update.get("moments") == moments
    if dtype == "bf16":
        assert {p.dtype for p in model_params} == {torch.bfloat16}
        assert update.get("main_params") == main_params == 4 * counts.total
        return  # the shard counts below do not depend on the dtype
    assert main_params == 0  # fp32: the optimizer steps the model's own params
    assert "main_params" not in {t.key for t in update.terms}

    # The TP shards: megatron marks which params it splits (and along which dim); at TP=2 each split param has
    # 1/2 of its elements per rank, the vocabulary ones of the vocabulary padded for TP=2.
    named = dict(actor.model[0].module.named_parameters())  # fp32: DDP wraps the GPTModel itself
    tp = 2
    vocab = padded_vocab_size(arch.vocab_size, tp, cfg.model.make_vocab_size_divisible_by)
    want = 0
    for pname, p in named.items():
        if pname in ("embedding.word_embeddings.weight", "output_layer.weight"):
            want += vocab // tp * arch.hidden_size
        elif getattr(p, "tensor_model_parallel", False):
            want += p.numel() // tp
        else:
            want += p.numel()
    assert param_counts(arch, tp=tp, vocab_divisible_by=cfg.model.make_vocab_size_divisible_by).per_rank_max == want

    # Two pipeline stages: the first holds the embedding and the first half of the layers, the last the rest,
    # the final norm and the output layer (with tied embeddings, megatron's own copy of the embedding).
    def layer(pname):
        return int(pname.split(".")[2]) if pname.startswith("decoder.layers.") else None

    half = arch.num_layers // 2
    first = sum(
        p.numel() for n, p in named.items() if n.startswith("embedding.") or (layer(n) is not None and layer(n) < half)
    )
    last = sum(
        p.numel()
        for n, p in named.items()
        if n == "decoder.final_layernorm.weight"
        or n == "output_layer.weight"
        or (layer(n) is not None and layer(n) >= half)
    )
    if arch.tie_word_embeddings:
        last += named["embedding.word_embeddings.weight"].numel()
    pp_counts = param_counts(arch, tp=1, pp=2, vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    assert pp_counts.per_stage_rank == (first, last)


def test_bf16_and_distributed_optimizer_bytes_per_param():
    """bf16 weights, fp32 grads, fp32 main params and two fp32 moments; the distributed optimizer shards the
    last three's optimizer part over DP x CP, never the grad buffer."""
    assert trainer_state_bytes(1000, bf16=True, distributed_optimizer=False, dp_cp=8) == TrainerStateBytes(
        weights=2000, grads=4000, main_params=4000, moments=8000
    )
    assert trainer_state_bytes(1000, bf16=True, distributed_optimizer=True, dp_cp=8) == TrainerStateBytes(
        weights=2000, grads=4000, main_params=500, moments=1000
    )
    assert trainer_state_bytes(1000, bf16=False, distributed_optimizer=True, dp_cp=8).main_params == 0


def test_builtin_table_matches_the_published_parameter_counts():
    """Qwen2.5's published totals (the sum of the safetensors of Qwen/Qwen2.5-7B, -14B, -32B)."""
    for name, published in [
        ("Qwen2.5-Math-7B", 7_615_616_512),
        ("Qwen2.5-14B", 14_770_033_664),
        ("Qwen2.5-32B", 32_763_876_352),
    ]:
        arch, source = resolve_arch(f"no-such-dir/{name}")
        assert "built-in table" in source
        assert param_counts(arch).total == published, name
    arch, _ = resolve_arch("models/Qwen2.5-Math-7B-16k-think")
    assert arch == resolve_arch("models/Qwen2.5-Math-7B")[0]


# ----- (b) the shipped GPU recipes fit; their output is docs/cluster.md's -------------------------------------------


def test_gpu_recipes_fit_and_output_matches_snapshot(in_clean_checkout, capsys):
    """Every phase of the 7B (8 nodes), 14B and 32B (16 nodes) recipes fits in 80 GiB. The printed plans are
    snapshotted: a change shows up as a reviewed diff, and docs/cluster.md's copy is regenerated from the snapshot."""
    texts = []
    for recipe, nodes in GPU_RECIPES:
        code, out, err = cli(capsys, recipe, "--nodes", str(nodes))
        assert code == 0, out + err
        assert out.rstrip().splitlines()[-1].startswith("fits: the fullest phase is generate")
        again = cli(capsys, recipe, "--nodes", str(nodes))[1]
        assert again == out
        texts.append(f"$ python tools/plan.py {recipe} --nodes {nodes}\n{out}")
    current = "\n".join(texts)
    if os.environ.get("LUFFY_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(current)
    committed = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if current != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                current.splitlines(keepends=True),
                fromfile=str(SNAPSHOT.relative_to(REPO)),
                tofile="tools/plan.py",
            )
        )
        pytest.fail(
            "The plans of the GPU recipes changed. If intended, regenerate with\n"
            "  LUFFY_UPDATE_SNAPSHOT=1 pytest tests/unit/test_plan.py\n"
            f"and update docs/cluster.md's copy.\n{diff}"
        )


def test_gpu_recipes_keep_the_main_runs_luffy_settings():
    main = load_config(str(REPO / "recipes/luffy_main.yaml"))
    for recipe, nodes in GPU_RECIPES:
        cfg = load_config(str(REPO / recipe))
        assert cfg.parallel.nnodes == nodes and cfg.parallel.world_size == 8 * nodes
        for section in ("algo", "reward"):
            assert getattr(cfg, section) == getattr(main, section), (recipe, section)
        # Qwen3's own chat template lacks the <think> LUFFY needs: that recipe names the project's template
        expected_template = "default" if "qwen3" in recipe else main.data.chat_template
        assert cfg.data.chat_template == expected_template, recipe
        assert replace(cfg.data, chat_template=None) == replace(main.data, chat_template=None), recipe
        for key in (
            "n",
            "n_off_policy",
            "prefix_strategy",
            "min_prefix_ratio",
            "max_prefix_ratio",
            "temperature",
            "top_p",
            "top_k",
            "val_temperature",
            "max_prefix_len",
            "gpu_memory_utilization",
        ):
            assert getattr(cfg.rollout, key) == getattr(main.rollout, key), (recipe, key)
        for key in (
            "lr",
            "weight_decay",
            "grad_clip",
            "ppo_mini_batch_size",
            "ppo_epochs",
            "ppo_max_token_len_per_gpu",
            "use_dynamic_bsz",
            "zero_lr_first_step",
        ):
            assert getattr(cfg.actor, key) == getattr(main.actor, key), (recipe, key)


def test_upstream_single_node_layout_is_refused_with_what_to_change():
    """The old luffy_main (7B at TP=1, 32k tokens per GPU, no recompute, engines awake beside full optimizer
    state) is far over 80 GiB; each change the messages name brings it down."""
    old = [
        "parallel.nnodes=1",
        "parallel.tensor_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        "model.recompute_granularity=none",
        "actor.offload_during_rollout=false",
    ]
    plan = make_plan(load_config(str(REPO / "recipes/luffy_main.yaml"), old))
    assert not plan.fits
    update = plan.phase("update")
    assert update.total > 150 * GIB
    largest = max((t for t in update.terms if t.bytes), key=lambda t: t.bytes)
    assert largest.key == "activations"
    messages = "\n".join(plan.problems)
    assert "largest term: activations" in messages and "model.recompute_granularity=full" in messages
    assert "largest term: engine reservation" in messages and "actor.offload_during_rollout=true" in messages
    recompute = make_plan(
        load_config(str(REPO / "recipes/luffy_main.yaml"), old + ["model.recompute_granularity=full"])
    )
    assert recompute.phase("update").get("activations") < update.get("activations") / 5


def test_offload_and_utilization_decide_the_generate_phase():
    recipe = str(REPO / "recipes/luffy_main.yaml")
    fits = make_plan(load_config(recipe))
    kept = make_plan(load_config(recipe, ["actor.offload_during_rollout=false"]))
    gen_fits, gen_kept = fits.phase("generate"), kept.phase("generate")
    assert gen_fits.get("grads") is None and gen_kept.get("grads") == fits.phase("update").get("grads")
    assert not kept.fits and "lower rollout.gpu_memory_utilization to at most 0." in kept.problems[0]
    limit = float(kept.problems[0].split("at most ")[1].split()[0])
    assert make_plan(
        load_config(recipe, ["actor.offload_during_rollout=false", f"rollout.gpu_memory_utilization={limit}"])
    ).fits
    # the reservation is util x GPU, whatever the weights: the KV cache gets the rest
    engine = sum(gen_fits.get(k) for k in ("engine_weights", "engine_kv", "engine_activations", "engine_cuda_graphs"))
    assert engine == pytest.approx(fits.cfg.rollout.gpu_memory_utilization * 80 * GIB, abs=4)


def test_the_kl_reference_is_on_the_gpu_for_the_update_and_offloaded_with_the_optimizer():
    recipe = str(REPO / "recipes/luffy_main.yaml")
    kl = make_plan(load_config(recipe, ["algo.use_kl_loss=true", "algo.kl_loss_coef=0.001"]))
    weights = kl.phase("update").get("weights")
    assert kl.phase("update").get("ref_weights") == weights
    assert kl.phase("generate").get("ref_weights") is None  # cluster/offload.py moves it to host
    kept = make_plan(
        load_config(recipe, ["algo.use_kl_loss=true", "algo.kl_loss_coef=0.001", "actor.offload_during_rollout=false"])
    )
    assert kept.phase("generate").get("ref_weights") == weights


def test_disaggregated_layout_plans_trainer_and_rollout_gpus_apart():
    """parallel.nnodes training nodes plus cluster.rollout_nnodes rollout nodes (cluster.layout.plan_layout)."""
    disaggregated = ["cluster.layout=disaggregated", "actor.offload_during_rollout=false", "parallel.nnodes=6"]
    cfg = load_config(str(REPO / "recipes/luffy_main.yaml"), disaggregated + ["cluster.rollout_nnodes=2"])
    plan = make_plan(cfg)
    assert (plan.layout.train_gpus, plan.layout.rollout_gpus, plan.layout.num_engines) == (48, 16, 8)
    assert plan.layout.dp == 24 and plan.fits
    assert format_plan(plan).startswith("plan for (config) on 8 nodes (6 training + 2 rollout) x 8 GPUs")
    generate = plan.phase("generate")
    assert generate.gpus == "rollout" and {t.key for t in generate.terms}.isdisjoint({"weights", "grads"})
    update = plan.phase("update")
    assert update.gpus == "trainer" and "engine_process" not in {t.key for t in update.terms}
    with pytest.raises(ConfigError, match="cluster.rollout_nnodes >= 1"):
        load_config(str(REPO / "recipes/luffy_main.yaml"), disaggregated)


def test_flops_scale_with_the_batch_and_update_is_three_forwards():
    recipe = str(REPO / "recipes/luffy_main.yaml")
    one = make_plan(load_config(recipe))
    two = make_plan(load_config(recipe, ["data.train_batch_size=256"]))
    assert one.flops.update == pytest.approx(3 * one.flops.old_log_probs)
    for key in ("generation", "old_log_probs", "update"):
        assert getattr(two.flops, key) == pytest.approx(2 * getattr(one.flops, key))
    # 6 x params x tokens dominates the update; the attention term is the rest
    assert 6 * one.params.matmul * one.step.tokens < one.flops.update < 1.1 * 6 * one.params.matmul * one.step.tokens
    slower = make_plan(load_config(recipe), Assumptions(mfu=0.175))
    assert slower.times_s.update == pytest.approx(2 * one.times_s.update)


# ----- (c) refusal of a 32B recipe at TP=1 on one node -----------------------------------------------------------


def test_refuses_32b_at_tp1_on_one_node_naming_the_largest_term():
    proc = run_cli(
        [
            "recipes/luffy_32b_16node.yaml",
            "--nodes",
            "1",
            "--set",
            "parallel.tensor_model_parallel_size=1",
            "--set",
            "parallel.sequence_parallel=false",
        ]
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdict = " ".join(proc.stdout[proc.stdout.index("DOES NOT FIT") :].split())  # unwrapped
    first = verdict.split("DOES NOT FIT")[1]
    assert "largest term: trainer grad buffer (fp32) = 122.1 GiB" in first
    assert "raise parallel.tensor_model_parallel_size (now 1)" in first
    assert "8 GPUs of 80 GiB" in proc.stdout and "TP=1 PP=1 CP=1 DP=8" in proc.stdout


# ----- (d) errors name the recipe and the setting -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipes/nope.yaml", "--nodes", "8"], "recipes/nope.yaml: recipe file not found"),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "actor.ppo_max_tokens=3"],
            "unknown key 'actor.ppo_max_tokens'",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "model.path=models/Mystery-9B"],
            "recipes/luffy_main.yaml: model.path='models/Mystery-9B': no config.json there",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "parallel.tensor_model_parallel_size=8"],
            "parallel.tensor_model_parallel_size=8 does not divide the model's 28 attention heads "
            "(model.path=models/Qwen2.5-Math-7B-16k-think)",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "rollout.tensor_model_parallel_size=8"],
            "rollout.tensor_model_parallel_size=8 does not divide the model's 28 attention heads",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "model.recompute_num_layers=3"],
            "model.recompute_num_layers=3 must divide the 28 layers",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "rollout.num_engines=4"],
            "colocated engines must exactly cover the trainer's GPUs: rollout.num_engines=4",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "parallel.pipeline_model_parallel_size=8"],
            "parallel.pipeline_model_parallel_size=8 does not divide the model's 28 layers",
        ),
        (
            [
                "recipes/luffy_14b_16node.yaml",
                "--nodes",
                "16",
                "--set",
                "parallel.pipeline_model_parallel_size=2",
                "--set",
                "model.recompute_num_layers=48",
            ],
            "model.recompute_num_layers=48 exceeds the 24 layers of a pipeline chunk",
        ),
        (
            ["recipes/luffy_main.yaml", "--nodes", "8", "--set", "parallel.nnodes=2"],
            "parallel.nnodes is set by --nodes",
        ),
        (["recipes/luffy_main.yaml"], "--nodes"),
        (["recipes/luffy_main.yaml", "--nodes", "0"], "--nodes: must be > 0"),
        (["recipes/luffy_main.yaml", "--nodes", "8", "--mfu", "1.5"], "--mfu: must be in (0, 1]"),
    ],
)
def test_cli_errors_name_the_recipe_or_setting(args, expected, in_clean_checkout, capsys):
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    assert expected in err, err


def test_cli_exit_status_of_the_script_on_a_setting_error():
    bad = run_cli(["recipes/luffy_main.yaml", "--nodes", "8", "--set", "rollout.tensor_model_parallel_size=3"])
    assert bad.returncode == 2 and "rollout.tensor_model_parallel_size=3" in bad.stderr


def test_reserve_is_kept_free():
    """32B at TP=8 on one node needs ~82.2 GiB in its update: inside 84 GiB, outside the 82 usable ones."""
    cfg = load_config(str(REPO / "recipes/luffy_32b_16node.yaml"), ["parallel.nnodes=1"])
    tight = make_plan(cfg, Assumptions(gpu_memory_gib=84.0, reserve_gib=0.0))
    assert tight.fits and 82 * GIB < tight.phase("update").total < 84 * GIB
    refused = make_plan(cfg, Assumptions(gpu_memory_gib=84.0))
    assert not refused.fits and refused.problems[0].startswith(
        "update needs 82.2 GiB per GPU, 0.2 GiB more than the 82.0 usable (84 GiB less the 2 GiB reserve)"
    )

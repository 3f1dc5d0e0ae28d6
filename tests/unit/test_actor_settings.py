"""What the actor refuses on a machine without CUDA / Transformer Engine, and what it passes to Megatron."""

import pytest
import torch

from luffy_megatron.actor.megatron_actor import Kernels, megatron_settings
from luffy_megatron.config import load_config

BASE = [
    "parallel.n_gpus_per_node=2",
    "rollout.tensor_model_parallel_size=1",
    "parallel.use_distributed_optimizer=false",
]


def settings(*overrides):
    return megatron_settings(load_config(None, BASE + list(overrides)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusals")
def test_cpu_refusals_name_the_setting():
    with pytest.raises(ValueError, match="model.fp8=e4m3 needs Transformer Engine"):
        settings("model.fp8=e4m3")
    with pytest.raises(ValueError, match="model.transformer_impl=transformer_engine"):
        settings("model.transformer_impl=transformer_engine")
    with pytest.raises(ValueError, match="parallel.context_parallel_size>1"):
        settings("parallel.context_parallel_size=2")
    with pytest.raises(ValueError, match="parallel.use_distributed_optimizer=true needs CUDA"):
        settings("parallel.use_distributed_optimizer=true")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_cpu_settings_use_local_spec_keep_bf16_and_pass_model_options():
    """bf16 asked on a CPU is bf16 (it used to become fp32 silently); no GPU fusions, no overlap."""
    s = settings("model.dtype=bf16", "model.recompute_granularity=full", "parallel.pipeline_model_parallel_size=2")
    assert s["use_te"] is False and s["params_dtype"] == torch.bfloat16
    o = s["config_overrides"]
    assert o["recompute_granularity"] == "full" and o["recompute_method"] == "uniform"
    assert o["recompute_num_layers"] == 1
    assert o["variable_seq_lengths"] is True  # token-budgeted micro-batches across pipeline stages
    assert "fp8" not in o
    for fusion in (
        "apply_rope_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "masked_softmax_fusion",
        "gradient_accumulation_fusion",
    ):
        assert o[fusion] is False, fusion
    assert s["ddp"]["overlap_grad_reduce"] is False and s["ddp"]["overlap_param_gather"] is False
    assert settings("model.dtype=fp32")["params_dtype"] == torch.float32


def test_recompute_settings_reach_megatron_names():
    o = settings("model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3")[
        "config_overrides"
    ]
    assert (o["recompute_granularity"], o["recompute_method"], o["recompute_num_layers"]) == ("full", "block", 3)
    o = settings("model.recompute_granularity=selective")["config_overrides"]
    assert o["recompute_granularity"] == "selective" and "recompute_num_layers" not in o
    assert "recompute_granularity" not in settings()["config_overrides"]


GPU_TE_APEX = Kernels(cuda=True, te=True, apex_wgrad=True, masked_softmax=True)


def test_gpu_settings_turn_on_megatron_training_fusions_and_overlap():
    cfg = load_config(
        None,
        [
            "parallel.n_gpus_per_node=8",
            "rollout.tensor_model_parallel_size=1",
            "parallel.use_distributed_optimizer=true",
        ],
    )
    s = megatron_settings(cfg, GPU_TE_APEX)
    o = s["config_overrides"]
    assert s["use_te"] is True and s["params_dtype"] == torch.bfloat16
    assert o["apply_rope_fusion"] and o["bias_activation_fusion"] and o["bias_dropout_fusion"]
    assert o["masked_softmax_fusion"] and o["gradient_accumulation_fusion"]
    ddp = s["ddp"]
    assert ddp["overlap_grad_reduce"] and ddp["overlap_param_gather"] and ddp["use_distributed_optimizer"]
    assert ddp["grad_reduce_in_fp32"] and ddp["bucket_size"] is None  # megatron-core's bucketing default
    # without apex's fused wgrad GEMM, megatron-core's own linear layers cannot fuse gradient accumulation
    no_apex = megatron_settings(cfg, Kernels(cuda=True, te=True, apex_wgrad=False))["config_overrides"]
    assert no_apex["gradient_accumulation_fusion"] is False and no_apex["apply_rope_fusion"] is True
    # without apex's softmax kernel megatron-core's fused softmax would raise at the first longer sequence: off
    no_softmax = megatron_settings(cfg, Kernels(cuda=True, te=True, apex_wgrad=True))["config_overrides"]
    assert no_softmax["masked_softmax_fusion"] is False and no_softmax["bias_activation_fusion"] is True
    # without TE there is no fused RoPE (and packed rows would loop per sequence): off
    no_te = megatron_settings(cfg, Kernels(cuda=True, te=False, apex_wgrad=True))
    assert no_te["use_te"] is False and no_te["config_overrides"]["apply_rope_fusion"] is False
    # no distributed optimizer: nothing to overlap the param all-gather with
    plain = load_config(
        None,
        [
            "parallel.n_gpus_per_node=8",
            "rollout.tensor_model_parallel_size=1",
            "parallel.use_distributed_optimizer=false",
        ],
    )
    assert megatron_settings(plain, GPU_TE_APEX)["ddp"]["overlap_param_gather"] is False


def test_fp8_settings_and_equal_micro_batch_counts():
    cfg = load_config(None, ["parallel.n_gpus_per_node=8", "rollout.tensor_model_parallel_size=1", "model.fp8=hybrid"])
    s = megatron_settings(cfg, GPU_TE_APEX)
    o = s["config_overrides"]
    assert o["fp8"] == "hybrid" and o["fp8_recipe"] == "delayed" and o["tp_only_amax_red"] is False
    assert s["fp8"] is True and s["equal_micro_batches"] is True  # amax is all-reduced over TP x DP
    cfg.model.tp_only_amax_red = True
    s = megatron_settings(cfg, GPU_TE_APEX)
    assert s["config_overrides"]["tp_only_amax_red"] is True and s["equal_micro_batches"] is False
    assert megatron_settings(load_config(None, BASE), GPU_TE_APEX)["equal_micro_batches"] is False


def test_fp8_recipe_without_transformer_engine_fails_at_start_naming_the_setting(tmp_path):
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(
        "model:\n  fp8: e4m3\nparallel:\n  n_gpus_per_node: 1\n  use_distributed_optimizer: false\n"
        "rollout:\n  tensor_model_parallel_size: 1\n"
    )
    cfg = load_config(recipe)
    with pytest.raises(ValueError, match="model.fp8=e4m3 needs Transformer Engine"):
        megatron_settings(cfg, Kernels(cuda=True, te=False, apex_wgrad=True))


def test_gradients_refuses_the_distributed_optimizers_partial_buffers():
    """Under the distributed optimizer each DP rank's grad buffer is reduced only on its own shard; reading it
    as the full gradient would be silently wrong, so `gradients()` refuses before running anything."""
    from types import SimpleNamespace

    from luffy_megatron.actor.megatron_actor import MegatronActor

    stub = SimpleNamespace(ddp_config=SimpleNamespace(use_distributed_optimizer=True))
    with pytest.raises(
        ValueError, match="parallel.use_distributed_optimizer=true each data-parallel rank holds only its reduced shard"
    ):
        MegatronActor.gradients(stub, None, advantages=None, old_log_probs=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusal")
def test_luffy_train_with_fp8_and_no_transformer_engine_fails_at_start(tmp_path, capsys):
    """Exit 2 with the setting named, before Ray, data or any model (no model path, data or cluster exists here)."""
    from luffy_megatron.train import loop

    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(
        "model:\n  fp8: hybrid\nparallel:\n  n_gpus_per_node: 1\n  use_distributed_optimizer: false\n"
        "rollout:\n  tensor_model_parallel_size: 1\ntrainer:\n  output_dir: " + str(tmp_path / "out") + "\n"
    )
    assert loop.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.fp8=hybrid needs Transformer Engine" in err
    assert not (tmp_path / "out").exists()  # nothing was started or written

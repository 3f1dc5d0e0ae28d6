"""What the actor refuses on a machine without CUDA / Transformer Engine, and what it passes to Megatron."""

import pytest
import torch

from luffy_megatron.actor.megatron_actor import megatron_settings
from luffy_megatron.config import load_config

BASE = ["parallel.n_gpus_per_node=2", "rollout.tensor_model_parallel_size=1", "parallel.use_distributed_optimizer=false"]


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
def test_cpu_settings_use_local_spec_fp32_and_pass_model_options():
    s = settings("model.dtype=bf16", "model.recompute_granularity=full", "parallel.pipeline_model_parallel_size=2")
    assert s["use_te"] is False and s["params_dtype"] == torch.float32
    o = s["config_overrides"]
    assert o["recompute_granularity"] == "full" and o["recompute_method"] == "uniform"
    assert o["variable_seq_lengths"] is True  # token-budgeted micro-batches across pipeline stages
    assert "fp8" not in o

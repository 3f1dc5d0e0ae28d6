"""bf16 through megatron-core's pipeline schedule at TP=2 x PP=2 (gloo, 4 ranks): the LUFFY loss forward and
backward agree with the fp32 run within bf16 tolerance, the pipeline p2p buffers are bf16, the model is
configured as megatron's own bf16 training (bf16=True, params and pipeline_dtype bf16), and the optimizer's
fp32 main params are the original fp32 weights, not their bf16 rounding (GPU readiness items 1-2)."""

from pathlib import Path

import pytest
import torch

from tests.dist.actor_fixtures import LR
from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    hf_dir = make_tiny_model("qwen2", root / "qwen2")  # fp32 weights that bf16 cannot represent exactly
    out = {}
    for dtype in ("fp32", "bf16"):
        path = root / f"{dtype}.pt"
        run_torchrun(HERE / "actor_checks.py", str(hf_dir), str(path), "2", "2", f"model.dtype={dtype}", nproc=4, timeout_s=600)
        out[dtype] = torch.load(path)
    return hf_dir, out


def test_bf16_model_is_configured_as_megatron_bf16_training(runs):
    _, out = runs
    assert out["bf16"]["precision"] == {"bf16": True, "pipeline_dtype": "torch.bfloat16", "params_dtype": "torch.bfloat16",
                                        "param_dtypes": ["torch.bfloat16"]}
    assert out["fp32"]["precision"]["pipeline_dtype"] == "torch.float32" and out["fp32"]["precision"]["bf16"] is False


def test_logits_reach_the_logprob_path_in_bf16(runs):
    """`Float16Module(..., fp32_output=False)`: no fp32 [tokens, vocab/TP] copy of the logits; the log-prob
    path upcasts one chunk at a time."""
    _, out = runs
    assert out["bf16"]["logits_dtypes"] == ["torch.bfloat16"]
    assert out["fp32"]["logits_dtypes"] == ["torch.float32"]


def test_pipeline_p2p_buffers_are_bf16(runs):
    _, out = runs
    assert out["bf16"]["p2p_dtypes"] == [("recv", "torch.bfloat16"), ("send", "torch.bfloat16")]
    assert out["fp32"]["p2p_dtypes"] == [("recv", "torch.float32"), ("send", "torch.float32")]


def test_bf16_logprobs_loss_and_gradients_agree_with_fp32(runs):
    _, out = runs
    a, b = out["fp32"], out["bf16"]
    mask = a["old_lp"] != 0
    assert mask.sum() > 30
    # bf16 has 8 bits of mantissa: log-probs of a ~-6 nat distribution within a few hundredths
    assert (a["old_lp"] - b["old_lp"]).abs()[mask].max() < 0.1
    assert (a["old_lp"] - b["old_lp"]).abs()[mask].mean() < 0.02
    for key in ("actor/pg_loss", "actor/loss_backward", "actor/entropy_loss"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=0.02), key
    assert b["metrics"]["actor/grad_norm"] == pytest.approx(a["metrics"]["actor/grad_norm"], rel=0.05)
    cos = []
    for k, g in a["grads"].items():
        assert b["grads"][k].dtype == torch.float32  # read from megatron's fp32 grad buffer
        cos.append(torch.nn.functional.cosine_similarity(g.flatten(), b["grads"][k].flatten(), dim=0).item())
    assert min(cos) > 0.99, min(cos)



def test_bf16_step_moves_the_weights_like_fp32(runs):
    """One Adam step (~lr per element) of the fp32 main params in the same direction as the fp32 run (elements
    whose gradient sign differs may differ by 2 x lr), and the bf16 weights are exactly those main params
    rounded to bf16."""
    hf_dir, out = runs
    from safetensors.torch import load_file

    init = load_file(str(hf_dir / "model.safetensors"))
    a, main, b = out["fp32"]["weights"], out["bf16"]["main_params_after"], out["bf16"]["weights"]
    for k, w0 in init.items():
        assert torch.equal(b[k], main[k].to(torch.bfloat16)), k
        assert ((main[k] - a[k]).abs() <= 2 * LR + 1e-6).all(), k
        cos = torch.nn.functional.cosine_similarity((main[k] - w0).flatten(), (a[k] - w0).flatten(), dim=0).item()
        assert cos > 0.9, (k, cos)
        assert (main[k] - w0).abs().max() > 0.5 * LR, k  # it did move


def test_main_params_are_the_original_fp32_weights(runs):
    hf_dir, out = runs
    from safetensors.torch import load_file

    hf = load_file(str(hf_dir / "model.safetensors"))
    main = out["bf16"]["main_params"]
    assert set(main) == set(hf)
    rounded_differs = 0
    for k, w in hf.items():
        assert main[k].dtype == torch.float32
        assert torch.equal(main[k], w), k  # exact: seeded from the fp32 values, not from the bf16 copy
        rounded_differs += not torch.equal(w.to(torch.bfloat16).float(), w)
    assert rounded_differs == len(hf)  # so a bf16-rounded main param would have failed above

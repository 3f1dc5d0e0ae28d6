"""Conversion and streaming export across TP x PP layouts: torchrun + gloo on CPU.

Two launches for the whole module: 2 processes for layouts 1x1 (DP=2), 2x1, 1x2 and 1x2 with
virtual PP 2; 4 processes (tiny models, a few seconds of work) for TP=2 x PP=2, which needs 4 ranks.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from luffy_megatron.convert import tools
from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import SPECS, make_tiny_model

pytestmark = pytest.mark.dist
SCRIPT = os.path.join(os.path.dirname(__file__), "convert_checks.py")
# the single-process converter writes each model's checkpoint for a different target layout, so
# every load under torchrun is a reload under another TP/PP (and vocab padding)
TARGETS = {"qwen2": (2, 1), "qwen2_tied": (1, 2), "llama": (2, 2), "llama_tied": (2, 1),
           "qwen3": (1, 2), "qwen3_tied": (2, 2), "mistral": (1, 1)}
LAYOUTS_2 = ["1x1", "2x1", "1x2", "1x2x2"]
MODELS_4 = ["qwen2", "llama_tied", "qwen3_tied"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = tmp_path_factory.mktemp("convert_dist")
    for i, name in enumerate(SPECS):
        make_tiny_model(name, w / "hf" / name, seed=i)
        tp, pp = TARGETS[name]
        tools.hf_to_megatron(w / "hf" / name, w / "ckpt" / name, tp=tp, pp=pp, quiet=True)
    return w


@pytest.fixture(scope="module")
def world2(workdir):
    return run_torchrun(SCRIPT, str(workdir), ",".join(LAYOUTS_2), nproc=2)


@pytest.fixture(scope="module")
def world4(workdir, world2):  # after world2 so the two launches never overlap
    return run_torchrun(SCRIPT, str(workdir), "2x2", "--stream", f"--models={','.join(MODELS_4)}",
                        nproc=4)


def _expect(result, kinds, layouts, models):
    want = {f"{lay}/{m}/{k}" for lay in layouts for m in models for k in kinds}
    missing = want - set(result["checks"])
    assert not result["failures"], "\n".join(result["failures"])
    assert not missing, sorted(missing)


def test_hf_megatron_hf_bit_exact_reloaded_under_other_layouts(world2, world4):
    _expect(world2, ["ckpt_export", "hf_export"], LAYOUTS_2, SPECS)
    _expect(world4, ["ckpt_export", "hf_export"], ["2x2"], MODELS_4)


def test_distributed_saved_checkpoint_reloads_under_next_layout(world2):
    for prev, lay in zip(LAYOUTS_2, LAYOUTS_2[1:]):
        _expect(world2, [f"saved_reload_from_{prev}"], [lay], SPECS)


def test_logits_parity_tp1_and_tp2(world2):
    _expect(world2, ["logits"], ["1x1", "2x1"], SPECS)
    diffs = world2["logits_max_abs_diff"]
    assert len(diffs) == 2 * len(SPECS) and max(diffs.values()) < 1e-4, diffs


def test_tp2_pp2_checkpoint_converts_back_bit_exact(workdir, world4, tmp_path):
    for m in MODELS_4:
        out = tmp_path / m
        tools.megatron_to_hf(workdir / "saved" / f"{m}-2x2", workdir / "hf" / m, out, quiet=True)
        want = load_file(str(workdir / "hf" / m / "model.safetensors"))
        got = load_file(str(out / "model.safetensors"))
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), m


def test_streaming_export_tp2_pp2_is_exact_with_bounded_memory(world4):
    _expect(world4, [], [], [])
    assert "stream/qwen2" in world4["checks"]
    for s in world4["streams"]:  # every one of the 4 ranks got the full HF state dict
        assert s == world4["stream"]
    s = world4["stream"]
    assert s["num_buckets"] > 5
    # a bucket never exceeds the limit except when one tensor alone is larger
    assert s["max_bucket_bytes"] <= max(s["bucket_bytes"], s["largest_tensor_bytes"])
    # the exporter let go of every earlier bucket (weakrefs of yielded tensors are dead)
    assert s["prev_buckets_alive_bytes"] == 0
    # what it holds at once: about one bucket + one TP-gather buffer, far below the model
    assert s["peak_tracked_bytes"] <= s["bucket_bytes"] + 2.6 * s["largest_tensor_bytes"], s
    assert s["peak_tracked_bytes"] < 0.5 * s["total_bytes"], s


def test_ipc_export_with_own_shards_gathers_only_what_vllm_does_not_split_tp2_pp2(world4):
    """Every rank's buffers hold, for each tensor vLLM narrows by TP rank, the HF tensor's part of its own TP rank
    (checked in convert_checks.own_shards_check, across the pipeline broadcast too), and the TP group exchanges
    none of those tensors any more: only the vocabulary's shards still travel."""
    _expect(world4, [], [], [])
    assert "own_shards/qwen2" in world4["checks"]
    owns = world4["owns"]
    assert len(owns) == 4 and all(o for o in owns)
    tp, split, vocab = owns[0]["tp"], owns[0]["split_bytes"], owns[0]["vocab_bytes"]
    assert tp == 2 and split > 0 and vocab > 0
    # each rank's buffers hold 1/TP of the split tensors' bytes that matter to its engine worker
    assert all(o["own_part_bytes"] * tp == split for o in owns)

    def total(key):
        return sum(o[key] for o in owns)

    # today: every rank receives the other TP ranks' shards of every split tensor and of the vocabulary
    assert total("tp_recv_bytes_full") == total("tp_send_bytes_full") == (tp - 1) * (split + vocab)
    # own shards: the split tensors no longer travel over the TP group; the vocabulary does, as before
    assert total("tp_recv_bytes_own") == total("tp_send_bytes_own") == (tp - 1) * vocab
    # the pipeline broadcast still moves whole buckets (each stage's to the same TP rank of the other stage)
    assert total("pp_broadcast_bytes_own") == total("pp_broadcast_bytes_full") > 0

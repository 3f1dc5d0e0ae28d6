"""recipes/luffy_qwen3_8b_8node.yaml end to end on a tiny Qwen3: the model check of `luffy-data model`, the
recipe's chat template on Qwen3's real tokenizer, and the conversion at the recipe's TP, as a user's
Qwen3-8B-Base takes the same path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from luffy_megatron.config import load_config
from luffy_megatron.convert import tools
from luffy_megatron.data.hub import check_model
from luffy_megatron.data.readers import Example
from luffy_megatron.data.tokenization import THINK_PREFIX, encode_example, resolve_chat_template
from tests.dist.tiny_models import make_tiny_model
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "luffy_qwen3_8b_8node.yaml"
SYS = "Think, then answer in \\boxed{}."


@pytest.fixture
def tiny_qwen3(tmp_path, qwen_tokenizer):
    """A random tiny Qwen3 (q/k norms, untied head) carrying Qwen3's real tokenizer and its own chat template."""
    hf = make_tiny_model("qwen3", tmp_path / "Qwen3-tiny")
    qwen_tokenizer.save_pretrained(hf)
    return hf


def test_the_recipe_uses_a_think_template_where_qwen3s_own_lacks_it(tiny_qwen3, qwen_tokenizer):
    cfg = load_config(str(RECIPE), [f"model.path={tiny_qwen3}"])
    # `luffy-data model` on it: usable, Qwen3's own template ends the prompt without <think>, so the default
    need = cfg.data.max_prompt_length + cfg.data.max_response_length
    report = check_model(tiny_qwen3, need_context=need)
    assert report.chat_template == "default" and report.prompt_ends_with.endswith("<|im_start|>assistant\n")
    assert any("<think>" in w for w in report.warnings)
    assert len(report.problems) == 1 and f"max_position_embeddings=256 < {need}" in report.problems[0]  # tiny
    assert check_model(tiny_qwen3, need_context=256).ok
    assert cfg.actor.zero_lr_first_step and cfg.model.path == str(tiny_qwen3)
    own = resolve_chat_template(qwen_tokenizer, "model")
    assert not own.ends_with_think  # the premise: Qwen3's template stops at "<|im_start|>assistant\n"
    template = resolve_chat_template(qwen_tokenizer, cfg.data.chat_template)
    assert template.source == "default" and template.ends_with_think
    row = Example(
        prompt=[{"role": "system", "content": SYS}, {"role": "user", "content": "What is 2+3?"}],
        demo=THINK_PREFIX + "2+3=5.\n</think>\n\\boxed{5}",
        ground_truth="5",
        data_source="",
    )
    encoded, outcome = encode_example(row, qwen_tokenizer, chat_template=template)
    assert outcome == "kept"
    assert encoded.prompt_text.endswith("<|im_start|>assistant\n" + THINK_PREFIX)
    # the demonstration lost its leading <think>\n (the prompt carries it), as upstream's data loader does
    assert qwen_tokenizer.decode(encoded.demo_ids).startswith("2+3=5.")


def test_tiny_qwen3_converts_at_the_recipes_tp_and_back_bit_exact(tiny_qwen3, tmp_path):
    cfg = load_config(str(RECIPE), [f"model.path={tiny_qwen3}"])
    tp = cfg.parallel.tensor_model_parallel_size
    tools.hf_to_megatron(tiny_qwen3, tmp_path / "ck", tp=tp, quiet=True)
    assert json.loads((tmp_path / "ck" / "luffy_meta.json").read_text())["tp"] == tp
    tools.megatron_to_hf(tmp_path / "ck", tiny_qwen3, tmp_path / "out", quiet=True)
    want = load_file(tiny_qwen3 / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert any("q_norm" in k for k in want)  # Qwen3's per-head q/k norms went through the conversion
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

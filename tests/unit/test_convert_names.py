"""Name maps and tensor transforms, checked against real transformers models' parameter names."""

import pytest
import torch

from luffy_megatron.convert.names import (
    expected_hf_shape,
    from_hf,
    hf_param_names,
    merge_qkv,
    rule_for,
    split_gathered_fc1,
    split_qkv,
    to_hf,
)
from luffy_megatron.models.hf_to_mcore import read_hf_arch
from tests.dist.tiny_models import SPECS, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(name, root / name) for name in SPECS}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hf_names_and_shapes_match_transformers(tiny_dirs, name):
    from safetensors.torch import load_file

    state = load_file(str(tiny_dirs[name] / "model.safetensors"))
    arch = read_hf_arch(tiny_dirs[name])
    assert hf_param_names(arch) == list(hf_param_names(arch))
    assert set(hf_param_names(arch)) == set(state)
    for n, t in state.items():
        assert expected_hf_shape(n, arch) == tuple(t.shape), n


def test_qkv_interleave_per_query_group_and_inverse():
    arch = read_hf_arch(
        dict(
            model_type="qwen2",
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=2,
        )
    )
    q = torch.arange(8 * 8.0).reshape(8, 8)
    k = 100 + torch.arange(4 * 8.0).reshape(4, 8)
    v = 200 + torch.arange(4 * 8.0).reshape(4, 8)
    qkv = merge_qkv(q, k, v, arch)
    # group 0: q heads 0,1 (rows 0-3), k head 0 (rows 0-1), v head 0; then group 1
    assert torch.equal(qkv[:4], q[:4]) and torch.equal(qkv[4:6], k[:2]) and torch.equal(qkv[6:8], v[:2])
    assert torch.equal(qkv[8:12], q[4:]) and torch.equal(qkv[12:14], k[2:])
    for a, b in zip(split_qkv(qkv, arch), (q, k, v)):
        assert torch.equal(a, b)
    bias = merge_qkv(q[:, 0], k[:, 0], v[:, 0], arch)
    assert torch.equal(bias, qkv[:, 0])


def test_gate_up_under_tp_and_layer_norm_spellings():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    shards = [torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]) for r in range(2)]
    g, u = split_gathered_fc1(torch.cat(shards), tp=2)
    assert torch.equal(g, gate) and torch.equal(u, up)
    lm = {0: 5}  # module 0 of this chunk is global layer 5 (PP renumbering)
    te = rule_for("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", lm)
    local = rule_for("decoder.layers.0.input_layernorm.weight", lm)
    assert te.hf_names == local.hf_names == ("model.layers.5.input_layernorm.weight",)
    assert (
        rule_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", lm).hf_names
        == rule_for("decoder.layers.0.pre_mlp_layernorm.weight", lm).hf_names
    )
    assert rule_for("decoder.layers.0.self_attention.linear_proj.weight", lm).tp_dim == 1
    assert rule_for("decoder.layers.0.mlp.linear_fc1._extra_state", lm) is None


def test_vocab_pad_unpad_and_shape_mismatch_names_the_tensor(tiny_dirs):
    arch = read_hf_arch(tiny_dirs["qwen2"])  # vocab 600
    emb = torch.randn(600, 64)
    rule = rule_for("embedding.word_embeddings.weight")
    shards = [from_hf(rule, lambda n: emb, arch, tp=2, tp_rank=r, local_shape=(384, 64)) for r in range(2)]
    assert torch.equal(shards[1][216:], torch.zeros(168, 64))
    [(name, back)] = to_hf(rule, torch.cat(shards), arch, tp=2)
    assert name == "model.embed_tokens.weight" and torch.equal(back, emb)
    bad = rule_for("decoder.layers.0.self_attention.linear_qkv.weight", {0: 0})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        from_hf(
            bad,
            lambda n: torch.zeros(7, 64) if "k_proj" in n else torch.zeros(expected_hf_shape(n, arch)),
            arch,
            tp=1,
            tp_rank=0,
            local_shape=(128, 64),
        )

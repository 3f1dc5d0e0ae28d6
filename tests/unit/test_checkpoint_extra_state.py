"""A checkpoint written without Transformer Engine loads into a model whose sharded state dict asks for TE's
`_extra_state` entries (FP8 metadata), and only those may be missing (GPU readiness item 6)."""

import io

import pytest
import torch

from luffy_megatron.convert import checkpoint as ckpt
from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
from luffy_megatron.models.parallel import init_model_parallel
from tests.dist.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra_state")
    hf_dir = make_tiny_model("qwen2", root / "hf")
    init_model_parallel(1, 1)
    arch = read_hf_arch(hf_dir)
    torch.manual_seed(1)
    model = build_model_chunks(arch, use_te=False)[0]
    ckpt.save_checkpoint(model, root / "ckpt", arch)
    return arch, root / "ckpt", {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _model_asking_for(arch, extra: dict):
    """A fresh model whose sharded state dict carries `extra` on top of its own (as TE layers carry
    `core_attention._extra_state` that megatron-core's local layers do not have)."""
    torch.manual_seed(2)
    model = build_model_chunks(arch, use_te=False)[0]
    own = model.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        return {**own(*args, **kwargs), **extra}

    model.sharded_state_dict = sharded_state_dict
    return model


def _te_extra_state(num_layers: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {
        f"decoder.layers.{i}.self_attention.core_attention._extra_state": ShardedObject(
            "decoder.layers.self_attention.core_attention._extra_state",
            io.BytesIO(),
            (num_layers,),
            (i,),
            replica_id=(0, 0, 0),
        )
        for i in range(num_layers)
    }


def test_te_extra_state_absent_from_the_checkpoint_is_ignored(saved):
    arch, path, weights = saved
    model = _model_asking_for(arch, _te_extra_state(arch.num_layers))
    assert any(k.endswith("core_attention._extra_state") for k in model.sharded_state_dict())
    ckpt.load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, weights[k]), k


def test_megatron_default_strictness_fails_on_them(saved):
    """What the loader did before: megatron-core's default (ASSUME_OK_UNEXPECTED) leaves the missing keys to the
    storage reader, which fails."""
    from megatron.core import dist_checkpointing

    arch, path, _ = saved
    model = _model_asking_for(arch, _te_extra_state(arch.num_layers))
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    with pytest.raises(
        CheckpointException,
        match="Missing key in checkpoint state_dict: decoder.layers.self_attention.core_attention._extra_state",
    ):
        dist_checkpointing.load(model.sharded_state_dict(), str(path))


def test_any_other_missing_tensor_is_an_error_naming_it(saved):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    arch, path, _ = saved
    extra = {
        "decoder.final_layernorm.bias": ShardedTensor.from_rank_offsets(
            "decoder.final_layernorm.bias", torch.zeros(arch.hidden_size)
        )
    }
    model = _model_asking_for(arch, {**_te_extra_state(arch.num_layers), **extra})
    with pytest.raises(RuntimeError, match=r"lacks 1 tensor\(s\) this model needs: decoder.final_layernorm.bias"):
        ckpt.load_checkpoint(model, path)

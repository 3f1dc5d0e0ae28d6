"""The single-process converters (`luffy-convert`), in this process (world of one, gloo)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from luffy_megatron.convert import tools
from luffy_megatron.convert.cli import main as convert_main
from tests.dist.tiny_models import make_tiny_model


def _hf_state(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def test_cli_round_trip_sharded_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_model("qwen2", tmp_path / "hf")
    assert (
        convert_main(
            ["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "ck"), "--tp", "2", "--pp", "2", "--quiet"]
        )
        == 0
    )
    meta = json.loads((tmp_path / "ck" / "luffy_meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["vocab_size_padded"]) == (2, 2, 768)
    assert (
        convert_main(
            [
                "megatron-to-hf",
                "--ckpt",
                str(tmp_path / "ck"),
                "--hf-config",
                str(hf),
                "--out",
                str(tmp_path / "out"),
                "--max-shard-size",
                "200K",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    want, got = _hf_state(hf), _hf_state(out)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = AutoModelForCausalLM.from_pretrained(hf)
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_bf16_tied_round_trip_keeps_dtype_and_omits_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_model("llama_tied", tmp_path / "hf32")
    AutoModelForCausalLM.from_pretrained(hf).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    tools.hf_to_megatron(tmp_path / "hf", tmp_path / "ck", tp=2, quiet=True)
    tools.megatron_to_hf(tmp_path / "ck", tmp_path / "hf", tmp_path / "out", quiet=True)
    want, got = _hf_state(tmp_path / "hf"), _hf_state(tmp_path / "out")
    assert "lm_head.weight" not in got and set(want) == set(got)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_errors_name_the_model_type_and_the_tensor(tmp_path, capsys):
    hf = make_tiny_model("qwen3", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(dict(cfg, model_type="phi3")))
    assert convert_main(["hf-to-megatron", "--hf", str(tmp_path / "bad"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "phi3" in err and "qwen3" in err
    # a checkpoint whose k_proj is the wrong shape for its config
    state = load_file(str(hf / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(10, 64)
    from safetensors.torch import save_file

    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        tools.hf_to_megatron(hf, tmp_path / "ck", quiet=True)
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        tools.hf_to_megatron(hf, tmp_path / "ck", tp=4, quiet=True)


def test_interrupted_export_leaves_no_output(tmp_path, monkeypatch):
    hf = make_tiny_model("qwen2_tied", tmp_path / "hf")
    tools.hf_to_megatron(hf, tmp_path / "ck", quiet=True)

    def explode(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tools, "copy_side_files", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        tools.megatron_to_hf(tmp_path / "ck", hf, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]


class _Built(Exception):
    pass


def test_converters_build_on_the_host_with_gloo_on_a_gpu_machine(tmp_path, monkeypatch):
    """N13: on a GPU node the converters still make the model's parameters on the host (a whole 32B model is
    65 GB on one GPU) in megatron-core's local layers, in a gloo world."""
    hf = make_tiny_model("qwen2", tmp_path / "hf")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    worlds, builds = [], []
    monkeypatch.setattr(tools, "init_model_parallel", lambda *args, **kw: worlds.append(kw))

    def build(arch, **kw):
        builds.append(kw)
        raise _Built

    monkeypatch.setattr(tools, "build_model_chunks", build)
    monkeypatch.setattr(tools, "read_checkpoint_meta", lambda ckpt: {"dtype": "float32"})
    with pytest.raises(_Built):
        tools.hf_to_megatron(hf, tmp_path / "ck", quiet=True)
    with pytest.raises(_Built):
        tools.megatron_to_hf(tmp_path / "ck", hf, tmp_path / "out", quiet=True)
    assert worlds == [{"cpu": True}, {"cpu": True}]
    for kw in builds:
        assert kw["use_cpu_initialization"] is True and kw["use_te"] is False and kw["perform_initialization"] is False


def test_host_build_reaches_megatron_config_on_a_gpu_machine(tmp_path, monkeypatch):
    from luffy_megatron.models.hf_to_mcore import build_transformer_config, read_hf_arch

    arch = read_hf_arch(make_tiny_model("qwen2", tmp_path / "hf"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_transformer_config(arch).use_cpu_initialization is False  # the trainer's ranks: on their GPU
    overrides = {k: v for k, v in tools.HOST_BUILD.items() if k != "use_te"}
    assert build_transformer_config(arch, **overrides).use_cpu_initialization is True


def test_a_cpu_world_is_gloo_on_a_gpu_machine(monkeypatch):
    from luffy_megatron.models import parallel

    made = []

    def no_device():
        raise AssertionError("a CPU world binds no CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parallel, "bind_local_device", no_device)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(parallel, "_init_private_world", lambda backend, kw: made.append((backend, kw)))
    assert parallel.ensure_process_group(cpu=True) is True
    assert made == [("gloo", {})]
    monkeypatch.setattr(parallel, "ensure_process_group", lambda **kw: made.append(kw) or _raise(_Built()))
    with pytest.raises(_Built):
        parallel.init_model_parallel(1, 1, cpu=True)
    assert made[-1] == {"cpu": True}


def _raise(err):
    raise err

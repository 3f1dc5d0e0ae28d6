"""The CPU suite's parity checks, on CUDA in bf16 (skipped without a GPU; see conftest.py).

- conversion: megatron-core logits from converted HF weights vs transformers' on the GPU, bf16;
- log-prob and entropy from bf16 logits vs the full-vocabulary fp32 computation, and its peak CUDA memory;
- one LUFFY update step in bf16 (Transformer Engine spec when it imports) vs an fp32 HF + torch reference;
- the same step with megatron's distributed optimizer (exact fp32 main params, overlap on);
- Transformer Engine's THD partitioned indices vs ours; LOCAL_RANK device binding; weight buckets to host.
"""

from pathlib import Path

import pytest
import torch

from tests.dist.actor_fixtures import LR, hf_token_logprobs, make_batch, reference_advantages, reference_update
from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import make_tiny_model

DIST = Path(__file__).resolve().parents[1] / "dist"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("gpu") / "qwen2")


def test_conversion_logits_match_transformers_on_cuda_bf16(hf_dir, megatron_world):
    from transformers import AutoModelForCausalLM

    from luffy_megatron.convert.weights import load_hf_weights
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch

    arch = read_hf_arch(hf_dir)
    model = build_model_chunks(arch, params_dtype=torch.bfloat16, construct_dtype=torch.float32)[0]
    load_hf_weights([model], arch, hf_dir)
    model = model.cuda().bfloat16().eval()
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(1, arch.vocab_size, (2, 48), device="cuda")
    pos = torch.arange(48, device="cuda").unsqueeze(0).expand(2, 48)
    with torch.no_grad():
        ours = model(ids, pos, None)[..., : arch.vocab_size].float()
        theirs = ref(ids).logits.float()
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


def test_logprob_from_bf16_logits_matches_full_vocab_and_saves_memory():
    from luffy_megatron.algo.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy

    torch.manual_seed(0)
    tokens, vocab = 8192, 151936
    logits = (torch.randn(tokens, vocab, device="cuda") * 3).bfloat16()
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    ref_lp, ref_ent = naive_logprob_entropy(logits.float(), target)

    def peak_extra(fn):
        x = logits.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lp, ent = fn(x)
        (lp.sum() + ent.sum()).backward()
        torch.cuda.synchronize()
        return lp.detach(), ent.detach(), torch.cuda.max_memory_allocated() - base

    lp, ent, ours = peak_extra(lambda x: vocab_parallel_logprob_entropy(x, target, chunk_tokens=1024))
    _, _, naive = peak_extra(lambda x: naive_logprob_entropy(x, target))
    assert (lp - ref_lp).abs().max() < 1e-3 and (ent - ref_ent).abs().max() < 1e-3
    logits_bytes = tokens * vocab * 2
    assert ours < 0.5 * logits_bytes + 4 * 1024 * vocab * 4  # the chunk's fp32 copies, not the vocabulary's
    assert naive > 4 * ours


def _actor_run(hf_dir, out, *overrides):
    run_torchrun(
        DIST / "actor_checks.py",
        str(hf_dir),
        str(out),
        "1",
        "1",
        "model.dtype=bf16",
        "model.transformer_impl=auto",
        *overrides,
        nproc=1,
        timeout_s=600,
    )
    return torch.load(out)


def test_bf16_update_step_matches_the_reference_on_cuda(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    got = _actor_run(hf_dir, tmp_path / "bf16.pt", "actor.use_sequence_packing=true")
    assert got["precision"]["bf16"] and got["logits_dtypes"] == ["torch.bfloat16"]
    batch = make_batch()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        lps, _ = hf_token_logprobs(model, batch)
    for i, n, lp in lps:
        assert (got["old_lp"][i, :n] - lp).abs().max() < 0.1, i
    ref = reference_update(hf_dir, batch, reference_advantages(batch), got["old_lp"])
    assert got["metrics"]["actor/loss_backward"] == pytest.approx(ref["loss"], rel=0.03)
    for k, g in ref["grads"].items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), got["grads"][k].flatten(), dim=0)
        assert cos > 0.98, k
    for k, w in ref["weights"].items():
        assert ((got["main_params_after"][k] - w).abs() <= 2 * LR + 1e-6).all(), k


def test_distributed_optimizer_step_on_cuda(hf_dir, tmp_path):
    """megatron's DistributedOptimizer (overlapped grad reduce / param gather): the step runs, and the
    weights exported after it (the param all-gather is forced before export) moved like the reference."""
    plain = _actor_run(hf_dir, tmp_path / "plain.pt")
    dist_opt = _actor_run(hf_dir, tmp_path / "distopt.pt", "parallel.use_distributed_optimizer=true")
    assert dist_opt["metrics"]["actor/pg_loss"] == pytest.approx(plain["metrics"]["actor/pg_loss"], rel=1e-3)
    assert dist_opt["metrics"]["actor/grad_norm"] == pytest.approx(plain["metrics"]["actor/grad_norm"], rel=1e-2)
    for k, w in plain["weights"].items():  # same step up to the optimizers' kernels (bf16 weights)
        assert torch.allclose(dist_opt["weights"][k].float(), w.float(), atol=2 * LR, rtol=2**-7), k


def test_thd_indices_match_transformer_engine():
    tex = pytest.importorskip("transformer_engine_torch")
    from luffy_megatron.actor.context_parallel import thd_partitioned_indices

    cu = torch.tensor([0, 8, 24, 32, 72], dtype=torch.int32)
    for cp in (2, 4):
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu.cuda(), 72, cp, rank).cpu().long()
            assert torch.equal(thd_partitioned_indices(cu, cp, rank), theirs), (cp, rank)


def test_local_rank_binds_the_device(monkeypatch):
    from luffy_megatron.models.parallel import bind_local_device

    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    assert bind_local_device() == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
    torch.cuda.set_device(0)


def test_object_store_buckets_leave_the_gpu_through_pinned_memory(monkeypatch):
    """A bucket filled on the GPU reaches `ray.put` as host bytes (Ray must never pickle device tensors), through
    a pinned host buffer."""
    from types import SimpleNamespace

    import ray

    from luffy_megatron.convert.export import FlatBucket, FlatEntry
    from luffy_megatron.sync.object_store import ObjectStoreTransport

    puts = []
    monkeypatch.setattr(ray, "put", lambda obj: puts.append(obj.copy()) or "ref")
    engine = SimpleNamespace(call=SimpleNamespace(remote=lambda *args: "load"))
    transport = ObjectStoreTransport(SimpleNamespace(engines=[engine]))
    transport._ctx_device = torch.device("cuda")
    bucket = FlatBucket(owner=0, entries=[FlatEntry("w", "float32", (3, 4), 0)], nbytes=256)
    buf = transport.buffer_for(bucket)
    assert buf.device.type == "cuda"
    buf[:48].view(torch.float32).copy_(torch.arange(12.0, device="cuda"))
    transport.transfer(SimpleNamespace(engine_get=lambda refs, what: None), iter([(bucket, buf)]))
    assert transport._buffer.device.type == "cpu" and transport._buffer.is_pinned()
    (host,) = puts
    assert torch.equal(torch.from_numpy(host[:48]).view(torch.float32), torch.arange(12.0))

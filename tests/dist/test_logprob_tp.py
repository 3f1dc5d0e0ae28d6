"""Chunked vocab-parallel log-probs and entropy equal the plain full-vocabulary computation."""

import pytest
import torch

from luffy_megatron.algo.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy
from tests.dist.launcher import run_torchrun

HERE = __import__("pathlib").Path(__file__).parent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("inplace", [True, False])
def test_tp1_matches_full_vocab_forward_and_backward(temperature, inplace):
    torch.manual_seed(1)
    T, V = 37, 503
    logits = torch.randn(T, V) * 3
    target = torch.randint(0, V, (T,))
    g_logp, g_ent = torch.randn(T), torch.randn(T)
    a = logits.clone().requires_grad_(True)
    lp, ent = naive_logprob_entropy(a, target, temperature=temperature)
    (lp * g_logp + ent * g_ent).sum().backward()
    b = logits.clone().requires_grad_(True)
    lp2, ent2 = vocab_parallel_logprob_entropy(b * 1.0, target, temperature=temperature, chunk_tokens=8, inplace_backward=inplace)
    (lp2 * g_logp + ent2 * g_ent).sum().backward()
    assert torch.allclose(lp2, lp, atol=1e-5)
    assert torch.allclose(ent2, ent, atol=1e-5)
    assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_only_logprob_used_still_backpropagates():
    torch.manual_seed(2)
    logits = torch.randn(5, 50, requires_grad=True)
    target = torch.randint(0, 50, (5,))
    lp, _ = vocab_parallel_logprob_entropy(logits * 1.0, target)
    lp.sum().backward()
    ref = torch.nn.functional.one_hot(target, 50) - torch.softmax(logits.detach(), -1)
    assert torch.allclose(logits.grad, ref, atol=1e-6)


def test_bad_shapes_and_temperature_are_refused():
    with pytest.raises(ValueError, match="expected logits"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)


@pytest.mark.dist
def test_tp2_matches_full_vocab():
    result = run_torchrun(HERE / "logprob_tp.py", nproc=2)
    assert result["world"] == 2
    for temperature, c in result["checks"].items():
        assert c["logp_max_err"] < 1e-5, (temperature, c)
        assert c["entropy_max_err"] < 5e-5, (temperature, c)  # entropies ~ log(1000) ~ 7: fp32 relative ~1e-6
        assert c["grad_max_rel_err"] < 1e-5, (temperature, c)


def test_vocabulary_padding_gets_zero_probability():
    """Megatron pads the vocabulary; padded ids must not take probability mass (HF has no such rows)."""
    torch.manual_seed(3)
    T, V, real = 9, 64, 50
    logits = torch.randn(T, V)
    target = torch.randint(0, real, (T,))
    a = logits[:, :real].clone().requires_grad_(True)
    lp, ent = naive_logprob_entropy(a, target)
    (lp + ent).sum().backward()
    b = logits.clone().requires_grad_(True)
    lp2, ent2 = vocab_parallel_logprob_entropy(b * 1.0, target, valid_vocab_size=real, chunk_tokens=4)
    (lp2 + ent2).sum().backward()
    assert torch.allclose(lp2, lp, atol=1e-5) and torch.allclose(ent2, ent, atol=1e-5)
    assert torch.allclose(b.grad[:, :real], a.grad, atol=1e-5)
    assert b.grad[:, real:].abs().max() == 0

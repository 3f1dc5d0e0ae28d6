"""actor.offload_during_rollout (luffy_megatron/cluster/offload.py) on megatron-core-shaped objects: what moves,
what is released, what stays, and that training continues bit for bit after the round trip. The real
MegatronActor round trip runs in tests/e2e/test_cluster_gpu_sim.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from luffy_megatron.cluster.offload import offload_to_host, reload_to_device


class Chunk(torch.nn.Module):
    """A DDP-like chunk: weights plus one contiguous grad buffer that every `param.main_grad` views."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(6, 4, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(3, generator=g))
        numel = sum(p.numel() for p in self.parameters())
        self.buffers = [SimpleNamespace(grad_data=torch.zeros(numel), param_data=None)]
        self.expert_parallel_buffers = []
        offset = 0
        for p in self.parameters():
            p.main_grad = self.buffers[0].grad_data[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


def mixed_precision(seed: int = 0):
    """Float16Optimizer-like: Adam steps fp32 main copies distinct from the model's weights."""
    chunk = Chunk(seed)
    mains = [p.detach().clone().float().requires_grad_() for p in chunk.parameters()]
    inner = torch.optim.Adam(mains, lr=0.1)
    return chunk, mains, SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)])


def step(chunk, mains, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p, main in zip(chunk.parameters(), mains):
        p.main_grad.copy_(torch.randn(p.shape, generator=g))
        main.grad = p.main_grad.clone()
    for opt in optimizer.chained_optimizers:
        opt.optimizer.step()
    with torch.no_grad():
        for p, main in zip(chunk.parameters(), mains):
            p.copy_(main)


def state_tensors(optimizer):
    return [
        t
        for opt in optimizer.chained_optimizers
        for s in opt.optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]


def test_round_trip_moves_optimizer_state_releases_grads_and_keeps_training_identical():
    chunk, mains, opt = mixed_precision()
    twin_chunk, twin_mains, twin_opt = mixed_precision()  # same seed: an identical twin that never offloads
    step(chunk, mains, opt, seed=1)
    step(twin_chunk, twin_mains, twin_opt, seed=1)
    weights_before = [p.data_ptr() for p in chunk.parameters()]
    state_before = [t.clone() for t in state_tensors(opt)]
    # hold the original storages: freed ones could be reused by the allocator for the host copies, and then
    # equal addresses would not mean "did not move"
    originals = state_tensors(opt) + [m.data for m in mains]
    ptrs_before = [t.data_ptr() for t in originals]
    views = [p.main_grad for p in chunk.parameters()]

    off = offload_to_host(opt, [chunk])

    # Adam moments (exp_avg, exp_avg_sq, step) and the fp32 main params now live in fresh host tensors
    assert off.host_bytes == sum(t.numel() * t.element_size() for t in state_before) + sum(m.numel() * 4 for m in mains)
    ptrs_offloaded = [t.data_ptr() for t in state_tensors(opt)] + [m.data_ptr() for m in mains]
    assert not set(ptrs_offloaded) & set(ptrs_before)
    for before, now in zip(state_before, state_tensors(opt)):
        assert torch.equal(before, now)
    # the gradient buffer's storage is released in place; the weights did not move
    assert chunk.buffers[0].grad_data.untyped_storage().nbytes() == 0 and off.freed_bytes == 27 * 4
    assert [p.data_ptr() for p in chunk.parameters()] == weights_before

    reload_to_device(off)

    assert all(p.main_grad is v for p, v in zip(chunk.parameters(), views))  # megatron's views stay valid
    assert chunk.buffers[0].grad_data.untyped_storage().nbytes() == 27 * 4
    assert all(float(v.abs().sum()) == 0.0 for v in views)  # re-allocated as zeros (update() zeroes them anyway)
    for before, now in zip(state_before, state_tensors(opt)):
        assert torch.equal(before, now)
    # and the next steps are exactly those of an optimizer that never left
    for seed in (2, 3):
        step(chunk, mains, opt, seed)
        step(twin_chunk, twin_mains, twin_opt, seed)
    for a, b in zip(list(chunk.parameters()) + mains, list(twin_chunk.parameters()) + twin_mains):
        assert torch.equal(a, b)
    assert reload_to_device(off) is None and off.moved == []  # a second reload has nothing left to do


def test_optimizer_stepping_the_model_weights_leaves_them_in_place():
    """megatron's FP32Optimizer: Adam's params are the model's own fp32 weights, needed by the weight sync and
    the engines during rollout, so only Adam's moments move."""
    chunk = Chunk(0)
    inner = torch.optim.Adam(list(chunk.parameters()), lr=0.1)
    opt = SimpleNamespace(optimizer=inner)  # a single (unchained) megatron optimizer
    for p in chunk.parameters():
        p.grad = torch.ones_like(p)
    inner.step()
    weights = [(p.data_ptr(), p.clone()) for p in chunk.parameters()]
    off = offload_to_host(opt, [chunk])
    assert [p.data_ptr() for p in chunk.parameters()] == [w[0] for w in weights]
    moments = sum(p.numel() for p in chunk.parameters()) * 2 * 4
    assert off.host_bytes == moments + 2 * 4  # exp_avg + exp_avg_sq per weight, plus the two step counters
    reload_to_device(off)
    assert all(torch.equal(p, w[1]) for p, w in zip(chunk.parameters(), weights))


def test_the_kl_reference_moves_to_host_and_comes_back_bit_for_bit():
    """A frozen chunk (the KL reference) passed as `frozen_chunks`: every weight goes to a fresh host tensor while
    the engines generate, and comes back unchanged; the policy's weights stay put."""
    chunk, mains, opt = mixed_precision()
    reference = Chunk(5)
    for p in reference.parameters():
        p.requires_grad_(False)
    values = [p.detach().clone() for p in reference.parameters()]
    held = [p.data for p in reference.parameters()]  # keep the originals alive: addresses stay meaningful
    policy = [p.data_ptr() for p in chunk.parameters()]

    off = offload_to_host(opt, [chunk], frozen_chunks=[reference])

    moved = [p.data_ptr() for p in reference.parameters()]
    assert not set(moved) & {t.data_ptr() for t in held}
    assert all(torch.equal(p, v) for p, v in zip(reference.parameters(), values))
    assert [p.data_ptr() for p in chunk.parameters()] == policy
    state = sum(t.numel() * t.element_size() for t in state_tensors(opt)) + sum(m.numel() * 4 for m in mains)
    assert off.host_bytes == state + sum(v.numel() * 4 for v in values)

    reload_to_device(off)
    assert all(torch.equal(p, v) for p, v in zip(reference.parameters(), values))
    assert all(p.device == v.device for p, v in zip(reference.parameters(), values))

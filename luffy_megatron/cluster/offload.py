"""`actor.offload_during_rollout`: a Megatron rank's optimizer state and gradients (and the KL reference's
weights, when there is one) leave the GPU while the colocated engine generates, and come back before the
update.

What moves is what megatron-core 0.16's own RL offload moves (`MegatronOptimizer.offload_to_cpu`,
`DistributedDataParallel.offload_grad_buffers`), with two differences:

* tensors of the optimizer that share storage with a model weight stay put (megatron's FP32Optimizer steps the
  model's own fp32 parameters; moving those would take the weights the sync and the engines need), and
* the move is a real copy into fresh host tensors on every device, CPU included, so what happens on a GPU node
  happens (and is tested) on a CPU machine too: the original storage is released and the values come back
  bit for bit.

Optimizer state (Adam moments, the fp32 main parameters of mixed precision) is copied to host (pinned when CUDA
is present) and the optimizer's references point at the host copies, so a checkpoint saved during rollout reads
them from there. Gradient buffers are released in place (``storage().resize_(0)``, which keeps every
``param.main_grad`` view valid) and re-allocated as zeros: `MegatronActor.update` zeroes them before every
mini-batch, so their values carry nothing between steps and copying them would only cost PCIe time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class Offloaded:
    """What `offload_to_host` moved, to put back with `reload_to_device`."""

    moved: list = field(default_factory=list)  # (container, key, device): container[key] is now a host tensor
    freed: list = field(default_factory=list)  # (tensor, storage_nbytes) of released gradient buffers
    host_bytes: int = 0
    freed_bytes: int = 0


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _torch_optimizers(optimizer) -> Iterator[Any]:
    """The torch optimizers inside megatron-core's wrappers (ChainedOptimizer -> MegatronOptimizer -> torch)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not getattr(opt, "is_stub_optimizer", False):
            yield inner


def _grad_buffers(model_chunks) -> Iterator[Any]:
    for chunk in model_chunks:
        yield from getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])


def offload_to_host(optimizer, model_chunks, frozen_chunks=()) -> Offloaded:
    """Moves the optimizer state of `optimizer` (a megatron-core optimizer) to host and releases the gradient
    buffers of `model_chunks` (megatron-core DDP modules). `frozen_chunks`: modules read only after the rollout
    (the KL reference, `actor/reference.py`), whose parameters all move to host too, as upstream offloads its
    reference. Returns what to give `reload_to_device`."""
    weights = {_storage_key(p) for chunk in model_chunks for p in chunk.parameters()}
    pin = torch.cuda.is_available()
    out = Offloaded()

    def movable(t) -> bool:
        return isinstance(t, torch.Tensor) and t.numel() > 0 and _storage_key(t) not in weights

    def to_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        out.host_bytes += host.numel() * host.element_size()
        return host

    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:  # main parameters: the same Parameter (a key of opt.state) gets host data
                if movable(p):
                    out.moved.append((_ParamData(p), None, p.device))
                    p.data = to_host(p.data)
        for state in opt.state.values():
            for key, t in list(state.items()):
                if movable(t):
                    out.moved.append((state, key, t.device))
                    state[key] = to_host(t)
    for chunk in frozen_chunks:
        for p in chunk.parameters():
            if movable(p):
                out.moved.append((_ParamData(p), None, p.device))
                p.data = to_host(p.data)
    for buffer in _grad_buffers(model_chunks):
        grad = getattr(buffer, "grad_data", None)
        param_data = getattr(buffer, "param_data", None)
        if grad is None or grad.untyped_storage().nbytes() == 0:
            continue
        if param_data is not None and _storage_key(param_data) == _storage_key(grad):
            continue  # megatron's MXFP8 shared param/grad buffer holds weights too
        nbytes = grad.untyped_storage().nbytes()
        grad.untyped_storage().resize_(0)
        out.freed.append((grad, nbytes))
        out.freed_bytes += nbytes
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed before the device memory is reused
        torch.cuda.empty_cache()  # and the freed blocks go back to the driver for vLLM's wake_up
    return out


class _ParamData:
    """A container view of `param.data`, so parameters and state entries are moved back the same way."""

    def __init__(self, param: torch.Tensor):
        self.param = param

    def __getitem__(self, key):
        return self.param.data

    def __setitem__(self, key, value):
        self.param.data = value


def reload_to_device(off: Offloaded) -> None:
    """Puts back what `offload_to_host` moved: state tensors copied to their devices, gradient buffers
    re-allocated as zeros."""
    for grad, nbytes in off.freed:
        grad.untyped_storage().resize_(nbytes)
        grad.zero_()
    for container, key, device in off.moved:
        host = container[key]
        container[key] = host.to(device, non_blocking=host.is_pinned(), copy=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    off.moved, off.freed = [], []


def device_holdings(actor, offloaded: Offloaded | None) -> set[str]:
    """What a rank's actor holds on its device, in the memory plan's state terms (`utils.memory_ledger`):
    the weights once built; the grad buffer while its storage is allocated; the optimizer's fp32 main
    parameters (those that are not the model's own weights) and its Adam moments, and the KL reference's
    weights, unless `offload_to_host` moved them (`offloaded`)."""
    if actor is None:
        return set()
    held = {"weights"}
    if any(
        getattr(b, "grad_data", None) is not None and b.grad_data.untyped_storage().nbytes() > 0
        for b in _grad_buffers(actor.model)
    ):
        held.add("grads")
    if offloaded is None:
        weights = {_storage_key(p) for chunk in actor.model for p in chunk.parameters()}
        for opt in _torch_optimizers(actor.optimizer):
            if any(_storage_key(p) not in weights for g in opt.param_groups for p in g["params"]):
                held.add("main_params")
            if any(isinstance(t, torch.Tensor) and t.numel() for s in opt.state.values() for t in s.values()):
                held.add("moments")
        if getattr(actor, "reference", None) is not None:
            held.add("ref_weights")
    return held

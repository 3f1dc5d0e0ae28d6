"""CPU runs of megatron-core's training machinery (DDP grad buffers, optimizer, schedules).

megatron-core 0.16.1 hard-codes `device="cuda"` for small scratch tensors in its schedules
(`total_num_tokens`), optimizer wrappers (`_scale`, `found_inf`), grad-norm clipping and a few utils.
On a CPU-only torch those calls raise "Torch not compiled with CUDA enabled". Instead of patching each
function, the modules listed below see a `torch` whose tensor factories map a "cuda" device to "cpu";
every other attribute is the real torch. Applied only when CUDA is absent (see `apply`).
"""

from __future__ import annotations

import importlib

import torch

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like")
# megatron-core 0.16.1 modules that create "cuda" scratch tensors on the training path.
MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.data",
)


class _TorchOnCpu:
    """Forwards to torch, except that tensor factories asked for a CUDA device get the CPU."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return attr(*args, device=device, **kwargs)

        return factory


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core 0.16.1 `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'`
    before scaling the grads by max_norm / (total_norm + 1e-6) when that is below 1. Same rule, on CPU."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


_applied = False


def apply() -> bool:
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    proxy = _TorchOnCpu(torch)
    for name in MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    _applied = True
    return True

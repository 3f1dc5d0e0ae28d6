"""megatron-core patched to run on CPU-only machines (gloo): megatron-core 0.16.1, torch 2.13.0+cpu.

`apply_cpu_shim` applies the patches below only when CUDA is absent; on a GPU machine it does nothing.
Each patch is one function; its docstring names the upstream code (file:function, under megatron/core/)
that needs CUDA and what the patch does instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

_APPLIED = False


def cpu_shim_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shim() -> bool:
    """Patch megatron-core for CPU if CUDA is absent. Idempotent. Returns True if patches are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cpu_shim_needed():
        return False
    for patch in _PATCHES:
        patch()
    _APPLIED = True
    return True


def seed_everything(seed: int) -> None:
    """Seeds torch. `tensor_parallel/random.py:model_parallel_cuda_manual_seed` raises on CPU torch,
    so the CPU path seeds only the default generator; on GPU it seeds the model-parallel trackers too."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel  # lazy: the driver imports this module without megatron

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# --------------------------------------------------------------------------- the patches, in the order applied
# The megatron imports inside them are lazy: importing this module must not import megatron-core.


def _current_device_is_cpu() -> None:
    """Scratch buffers and RoPE's `inv_freq` are allocated with `device=torch.cuda.current_device()`
    (transformer/dot_product_attention.py:DotProductAttention.__init__,
    models/common/embeddings/rotary_pos_embedding.py:RotaryEmbedding.__init__, tensor_parallel/mappings.py,
    ...). On a CPU-only torch that raises; returning "cpu" puts those buffers on the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _rng_tracker_fork_is_noop() -> None:
    """tensor_parallel/random.py:CudaRNGStatesTracker.fork swaps CUDA RNG states around attention dropout and
    weight init; it raises "cuda rng state ... is not added" because `model_parallel_cuda_manual_seed` cannot
    run without CUDA. A no-op context keeps the default CPU generator (dropout is 0 in every model built
    here, so nothing differs)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker.fork = (  # type: ignore[method-assign]
        lambda self, name=None: contextlib.nullcontext()
    )


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _causal_mask_on_cpu() -> None:
    """transformer/utils.py:get_default_causal_mask builds the causal mask with `device="cuda"`; the torch
    softmax path (fusions/fused_softmax.py:FusedScaleMaskSoftmax.forward_torch_softmax, which imported the
    function by name) calls it whenever no mask is passed. Same mask, on the CPU, rebound in both modules."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mcore_utils

    mcore_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask


def _synchronize_is_noop() -> None:
    """The torch_dist checkpoint writer
    (dist_checkpointing/strategies/filesystem_async.py:FileSystemWriterAsync.preload_tensors) calls
    `torch.cuda.synchronize()` after its device-to-host copies even when every tensor is already on the CPU;
    without CUDA there is nothing to wait for."""
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


def _tied_embeddings_stay_on_cpu() -> None:
    """With tied embeddings and PP > 1,
    models/common/language_module/language_module.py:LanguageModule.setup_embeddings_and_output_layer moves
    the shared weight with `weight.data.cuda()` before all-reducing it over the embedding group. During that
    call only, `Tensor.cuda` returns the tensor itself, so the all-reduce runs on the CPU copy."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original_setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original_setup)
    def _setup_on_cpu(self, *args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # type: ignore[method-assign]
        try:
            return original_setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]

    LanguageModule.setup_embeddings_and_output_layer = _setup_on_cpu  # type: ignore[method-assign]


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like")
_CUDA_SCRATCH_MODULES = (
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


def _scratch_tensors_on_cpu() -> None:
    """The training machinery hard-codes `device="cuda"` for small scratch tensors: the schedules'
    `total_num_tokens` (pipeline_parallel/schedules.py:forward_backward_no_pipelining and the two pipelined
    schedules), the optimizer wrappers' `_scale`/`found_inf` (optimizer/optimizer.py), grad-norm clipping and
    a few utils (the modules in `_CUDA_SCRATCH_MODULES`). Those modules see a `torch` whose tensor factories
    map a "cuda" device to "cpu"; every other attribute is the real torch."""
    proxy = _TorchOnCpu(torch)
    for name in _CUDA_SCRATCH_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _clip_grads_on_cpu() -> None:
    """optimizer/clip_grads.py:clip_grad_by_total_norm_fp32 asserts `grad.type() == 'torch.cuda.FloatTensor'`
    before scaling the grads by max_norm / (total_norm + 1e-6) when that is below 1. Same rule, on CPU
    tensors (also rebound in optimizer/optimizer.py, which imported it by name)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu


def _float16_optimizer_takes_cpu_params() -> None:
    """optimizer/optimizer.py:Float16OptimizerWithFloat16Params.__init__ sorts parameters by `param.type()`
    against 'torch.cuda.BFloat16Tensor' / 'torch.cuda.HalfTensor' / 'torch.cuda.FloatTensor' and raises
    TypeError for CPU tensors, so bf16 training could not run on a CPU at all. During that constructor only,
    a CPU tensor's `type()` reports the CUDA name of its dtype; everything after (fp32 main params as
    `param.detach().clone().float()`, the step) is unchanged."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.optimizer import optimizer

    init = optimizer.Float16OptimizerWithFloat16Params.__init__

    @functools.wraps(init)
    def _init_with_cuda_type_names(self, *args, **kwargs):
        real_type = torch.Tensor.type

        def cuda_named_type(t, *a, **k):
            name = real_type(t, *a, **k)
            if a or k or t.is_cuda or not isinstance(name, str) or not name.startswith("torch."):
                return name
            return "torch.cuda." + name[len("torch.") :]

        torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
        try:
            init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = real_type  # type: ignore[method-assign]

    optimizer.Float16OptimizerWithFloat16Params.__init__ = _init_with_cuda_type_names


def _recompute_without_cuda_rng() -> None:
    """Activation recomputation (tensor_parallel/random.py:CheckpointFunction, used by recompute_granularity
    full and selective) saves and restores the CPU and the CUDA RNG states around the recomputed forward
    (`_get_all_rng_states` / `_set_all_rng_states`); the CUDA half (`_get_cuda_rng_state` /
    `_set_cuda_rng_state`) raises "Torch not compiled with CUDA enabled". Without CUDA there is no CUDA
    generator to keep: the CPU state is still saved and restored by the same functions."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


_PATCHES = (
    _current_device_is_cpu,
    _rng_tracker_fork_is_noop,
    _causal_mask_on_cpu,
    _synchronize_is_noop,
    _tied_embeddings_stay_on_cpu,
    _scratch_tensors_on_cpu,
    _clip_grads_on_cpu,
    _float16_optimizer_takes_cpu_params,
    _recompute_without_cuda_rng,
)

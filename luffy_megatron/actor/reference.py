"""The frozen reference policy of the KL terms (`algo.use_kl_loss`, `algo.kl_ctrl_coef`; upstream's `ref`
worker): a second copy of this rank's model chunks, made from the initial weights, never trained.

Upstream builds the reference from `actor_rollout_ref.model.path` (the HF weights the actor starts from) and
never updates it; here it comes from the same source as the actor's initial weights (`model.load_checkpoint`
when set, else `model.path`) and keeps them for the whole run. Resuming a training checkpoint restores the
policy only: the reference is rebuilt from those initial weights, so `model.path` / `model.load_checkpoint`
must still be readable when a run resumes.

The copy uses the policy's parallel layout (the same TP / PP / virtual-PP chunks and CP groups, so it runs
through the same micro-batching, schedule and log-prob path, `MegatronActor._forward_backward`) and the
same construction (fp32 parameters loaded exactly, then megatron's `Float16Module` cast for bf16), so before
the first update its log-probs are the policy's, bit for bit. It has no DDP wrapper, no gradient buffer, no
optimizer state and no gradients (`requires_grad=False`, eval mode).

Memory: it doubles the model weights on every GPU (one more copy of `trainer weights` per rank, e.g.
7.1 GiB per GPU for the 7B recipe at TP=2; `tools/plan.py` counts it), but adds no gradient or optimizer
state. With `actor.offload_during_rollout` its weights go to host with the optimizer state while colocated
engines generate (`cluster/offload.py`; upstream offloads its reference parameters too), and come back before
the log-probs of the step. While it is built the fp32 construction holds 4 bytes per parameter of this rank
for a moment.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from luffy_megatron.convert.checkpoint import load_checkpoint as load_model_checkpoint
from luffy_megatron.convert.weights import load_hf_weights
from luffy_megatron.models.hf_to_mcore import build_model_chunks


class ReferenceModel:
    """This rank's chunks of the frozen reference policy (`chunks`: what the schedule runs, one per
    virtual pipeline stage)."""

    def __init__(self, cfg, arch, settings: dict, hf_dir: str | os.PathLike):
        dtype = settings["params_dtype"]
        overrides = dict(settings["config_overrides"])
        # no backward ever runs through it; the weights are loaded, so no initialization either (which
        # also leaves the RNG streams as a run without a reference would have them)
        overrides.update(gradient_accumulation_fusion=False, perform_initialization=False)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            chunks = build_model_chunks(
                arch,
                params_dtype=dtype,
                construct_dtype=torch.float32,
                vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
                use_te=settings["use_te"],
                **overrides,
            )
        if cfg.model.load_checkpoint:
            load_model_checkpoint(chunks, cfg.model.load_checkpoint)
            self.source = str(cfg.model.load_checkpoint)
        else:
            load_hf_weights(chunks, arch, Path(hf_dir))
            self.source = str(hf_dir)
        if dtype != torch.float32:
            # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(chunks[0].config, c) for c in chunks]
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.chunks = chunks

    def num_bytes(self) -> int:
        """Bytes of this rank's reference weights."""
        return sum(p.numel() * p.element_size() for c in self.chunks for p in c.parameters())

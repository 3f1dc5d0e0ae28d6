"""Will a recipe fit on the GPUs, and how long will a step take? Decided from the config alone, before any
GPU is asked for (no torch.cuda, no Ray): memory per GPU in each phase of a step, FLOPs per step, and a
step-time estimate under stated assumptions. `tools/plan.py RECIPE --nodes N` prints it. A phase fits when
its total is at most the GPU's memory less `Assumptions.reserve_gib` (an "80 GB" H100 shows CUDA ~79.6 GiB).

Memory of one trainer rank (megatron-core 0.16.1, as `actor/megatron_actor.py` builds it)
  weights      bf16 params of this rank's TP x PP shard (`Float16Module` casts the model; fp32 runs keep fp32).
  grad buffer  fp32, every param of the rank: DDP with `grad_reduce_in_fp32=True` allocates one contiguous
               `grad_data` of the rank's numel (`distributed/param_and_grad_buffer.py`). It is not sharded by
               the distributed optimizer (reduce-scatter writes into it).
  optimizer    fp32 main params (bf16 runs only: `shard_fp32_from_float16_groups`, or the non-distributed
               optimizer's `param.detach().clone().float()`; fp32 runs step the params themselves) and Adam's
               exp_avg + exp_avg_sq in fp32. The distributed optimizer shards all three over DP x CP
               (`optimizer/distrib_optimizer.py`); the grads it hands Adam are views of the fp32 buffer.
               Bucket padding of the distributed optimizer (to lcm(DP, 128) elements per bucket and 64 per
               param) is < 0.1% and left out.
  activations  per layer and token, what autograd keeps (bf16): the inputs of both norms and of QKV and FC1
               (4h; divided by TP under sequence parallel, where megatron keeps the sequence shard and
               all-gathers again in backward), q, k, v and the attention output (2*heads*head_dim +
               2*kv_heads*head_dim), FC1's output and SwiGLU's output (3 * ffn), all divided by TP, plus fp32
               softmax statistics per head (fused attention). The local (non-TE) spec computes attention
               unfused and also keeps the probabilities, heads/TP x sequence length per token.
               recompute none: every layer; selective (megatron's default module core_attn): without the
               attention probabilities/statistics; full: only the input of each recompute unit
               (uniform: units of `recompute_num_layers`; block: the first `recompute_num_layers` layers of
               each chunk, the rest whole), plus the unit being recomputed during backward. Backward needs
               about one more layer for the gradients that replace the activations. Tokens per GPU are
               `actor.ppo_max_token_len_per_gpu` / CP. Pipeline stage s keeps PP - s micro-batches in flight
               (1F1B; interleaved: megatron's warm-up count of model chunks).
  logits       [tokens, padded vocab / TP] in the model's dtype: the actor calls the bf16 model with
               `fp32_output=False` (megatron's `Float16Module` would otherwise keep an fp32 copy), and
               `algo/logprob.py` keeps the logits for its backward, which writes the gradient over them.
  log-prob     `actor.log_prob_chunk_tokens` x vocab/TP in fp32, 3 copies live in `algo/logprob.py`.
  chunk

Memory of a colocated vLLM engine (vLLM 0.32): at start and at every wake-up vLLM takes
`gpu_memory_utilization` x the GPU's memory (the start fails if that much is not free): its weights at
`rollout.tensor_model_parallel_size`, the profiled activation peak (`max_num_batched_tokens` = 16384 on
H100 for the offline `LLM`, and the sampler's `max_num_seqs` x vocab fp32 buffers), and the KV cache in
the rest. The KV cache must hold one sequence of data.max_prompt_length + data.max_response_length (vLLM
refuses to start otherwise); it holds max_num_seqs such sequences only if there is room, else generation
runs at the concurrency that fits. Sleep level 1 (old log-probs and update) offloads the weights to host
and drops the KV cache; what stays is the worker process (CUDA context, NCCL).

Assumed order of a colocated step: update -> (actor.offload_during_rollout, `cluster/offload.py`: the grad
buffers are released and the optimizer state is copied to host) -> engines wake up -> weight sync ->
generate -> engines sleep -> old log-probs -> state back -> update. The plan counts the state on the GPU from
old log-probs on (the conservative case), and the weight sync with the engines fully awake (its buckets are
counted there). Disaggregated (as `cluster.layout.plan_layout`): parallel.nnodes
training nodes plus cluster.rollout_nnodes nodes that only generate.

Layout checks are luffy-train's own (`cluster.layout.layout_problems` and `check_model_parallelism`, on the
model's config.json or the built-in shapes), plus what only the shapes decide here (TP dividing the FFN,
recompute units dividing the layers of a pipeline chunk).

FLOPs per step (model FLOPs; full recompute's extra forward is not counted, so it lowers the MFU to use):
  matmul params N = every linear weight including the output layer (the embedding lookup does no math),
  causal attention forward per layer and sequence of S tokens = 2 * heads * head_dim * S^2.
  update = ppo_epochs x (6 N x tokens + 3 x attention), old log-probs = 2 N x tokens + attention,
  generation = 2 N per token (prompts and generated tokens) + 4 * heads * head_dim * layers per generated
  token and context token.
Step time: training and log-probs at `mfu` of `peak_tflops` per GPU; generation per engine as decode steps
that each read the engine's weight shard and the live KV cache at `gen_bandwidth_util` of the HBM
bandwidth (or compute at `mfu`, whichever is slower), for max(decode tokens / concurrency,
data.max_response_length) steps (the step waits for the longest response), plus prefill at `mfu`.
Rows per step are data.train_batch_size x rollout.n; lengths are the stated fractions of the maxima.
The frozen reference model (algo.use_kl_loss, algo.kl_ctrl_coef > 0 or algo.use_ref; actor/reference.py) adds
one more copy of the trainer weights (on the host while the engines generate when actor.offload_during_rollout
moves the optimizer state there too) and one more log-prob forward.
Not modeled: reward grading, the weight-sync transfer, offload copies, FP8 (bf16 is assumed).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from luffy_megatron.models.hf_to_mcore import HFArch, padded_vocab_size, read_hf_arch
from luffy_megatron.actor.batching import micro_batch_prompts
from luffy_megatron.algo.options import uses_reference

__all__ = [
    "Assumptions",
    "BUILTIN_HF_CONFIGS",
    "GIB",
    "Plan",
    "PlanError",
    "ParamCounts",
    "format_plan",
    "layer_params",
    "make_plan",
    "param_counts",
    "plan_with_suggestions",
    "resolve_arch",
    "suggest_fixes",
    "trainer_state_bytes",
]

GIB = 2**30

# Processes outside PyTorch's own tensors: CUDA context (~0.5 GiB on H100) and NCCL communicator buffers.
# The trainer has TP, DP, PP (and CP) groups, a vLLM worker its engine-TP group.
TRAINER_PROCESS_GIB = 1.5
ENGINE_PROCESS_GIB = 1.0
# Inside vLLM's reservation besides weights, activations and KV cache: cuBLAS workspaces and other
# non-torch allocations made during its profile run; CUDA graphs when enforce_eager=false.
ENGINE_NON_TORCH_GIB = 0.25
ENGINE_CUDA_GRAPHS_GIB = 1.0
VLLM_MAX_NUM_BATCHED_TOKENS = 16384  # vLLM 0.32's offline LLM default on >= 70 GiB GPUs other than A100
VLLM_VOCAB_PADDING = 64  # vLLM pads the vocabulary of its embedding and LM head to a multiple of 64
SAMPLER_COPIES = 3  # fp32 [max_num_seqs, vocab] buffers in vLLM's sampler (logits, probs, logprobs)
LOGPROB_CHUNK_COPIES = 3  # fp32 chunk copies alive at once in algo/logprob.py (forward and backward)
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on the variable-size tensors (activations, logits)


class PlanError(ValueError):
    """A recipe that cannot be planned (unknown model, impossible layout); the message names the setting."""


# --------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------

# The published Hugging Face config.json of each model (only the keys that decide shapes). Sources:
#   Qwen/Qwen2.5-Math-7B  hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064,
#                         untied embeddings (also the shapes of LUFFY's Elliott/Qwen2.5-Math-7B-16k-think,
#                         whose longer RoPE context changes no tensor size)
#   Qwen/Qwen2.5-14B      hidden 5120, 48 layers, 40 heads, 8 KV heads, intermediate 13824, vocab 152064, untied
#   Qwen/Qwen2.5-32B      hidden 5120, 64 layers, 40 heads, 8 KV heads, intermediate 27648, vocab 152064, untied
_QWEN25_COMMON = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, torch_dtype="bfloat16",
                      use_sliding_window=False, tie_word_embeddings=False, vocab_size=152064)
BUILTIN_HF_CONFIGS: dict[str, dict] = {
    "Qwen2.5-Math-7B": dict(_QWEN25_COMMON, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, intermediate_size=18944, max_position_embeddings=4096,
                            rope_theta=10000.0),
    "Qwen2.5-14B": dict(_QWEN25_COMMON, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=13824, max_position_embeddings=131072,
                        rope_theta=1000000.0, rms_norm_eps=1e-5),
    "Qwen2.5-32B": dict(_QWEN25_COMMON, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, max_position_embeddings=131072,
                        rope_theta=1000000.0, rms_norm_eps=1e-5),
}
_BUILTIN_ALIASES = {"Qwen2.5-Math-7B-16k-think": "Qwen2.5-Math-7B"}


def resolve_arch(model_path: str) -> tuple[HFArch, str]:
    """The model's shapes and where they came from: `model_path`/config.json when it exists, else the
    built-in table keyed by the path's basename."""
    hf_config, source = _hf_config(model_path)
    try:
        return read_hf_arch(hf_config), source
    except (ValueError, KeyError) as err:
        raise PlanError(f"model.path={model_path!r}: {source}: {err}") from None


def _hf_config(model_path: str) -> tuple[dict, str]:
    config_json = Path(model_path) / "config.json" if model_path else None
    if config_json is not None and config_json.is_file():
        try:
            return json.loads(config_json.read_text()), f"read from {config_json}"
        except json.JSONDecodeError as err:
            raise PlanError(f"model.path={model_path!r}: {config_json} is not valid JSON: {err}") from None
    name = os.path.basename(os.path.normpath(model_path)) if model_path else ""
    key = _BUILTIN_ALIASES.get(name, name)
    if key in BUILTIN_HF_CONFIGS:
        alias = f"; {name} has the same shapes" if key != name else ""
        return dict(BUILTIN_HF_CONFIGS[key]), (f"built-in table (the published config of Qwen/{key}{alias}), as "
                                               f"{config_json} does not exist")
    known = ", ".join([*BUILTIN_HF_CONFIGS, *_BUILTIN_ALIASES])
    raise PlanError(
        f"model.path={model_path!r}: no config.json there and {name or '(empty)'!r} is not in the built-in "
        f"table ({known}); point model.path at the Hugging Face model directory"
    )


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------


def layer_params(arch: HFArch, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (norms are replicated, everything else split)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    split = h * qkv_out + (qkv_out if arch.qkv_bias else 0) + arch.num_attention_heads * d * h + 3 * h * f
    replicated = 2 * h + (2 * d if arch.qk_norm else 0)
    return split // tp + replicated


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts at one layout. `vocab_padded` is megatron's padded vocabulary at this TP."""

    total: int  # the whole model, every parameter once
    per_stage_rank: tuple[int, ...]  # params on one TP rank of each pipeline stage
    matmul: int  # linear weights doing math per token (the output layer included, the embedding lookup not)
    vocab_padded: int

    @property
    def per_rank_max(self) -> int:
        return max(self.per_stage_rank)


def param_counts(arch: HFArch, *, tp: int = 1, pp: int = 1, vocab_divisible_by: int = 128) -> ParamCounts:
    """Megatron's parameters: embedding and output layer of the padded vocabulary (split over TP), the
    final norm on the last stage; with tied embeddings and PP > 1 the last stage holds its own copy of the
    embedding as output weight (megatron's shared embedding)."""
    h, num_layers = arch.hidden_size, arch.num_layers
    vocab = padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by)
    embedding = vocab * h
    per_layer = layer_params(arch, tp)
    stages = []
    for stage in range(pp):
        n = (num_layers // pp) * per_layer
        if stage == 0:
            n += embedding // tp
        if stage == pp - 1:
            n += h
            if not arch.tie_word_embeddings or pp > 1:
                n += embedding // tp
        stages.append(n)
    total = num_layers * layer_params(arch, 1) + h + embedding * (1 if arch.tie_word_embeddings else 2)
    d = arch.head_dim
    layer_matmul = h * (arch.num_attention_heads + 2 * arch.num_query_groups) * d \
        + arch.num_attention_heads * d * h + 3 * h * arch.ffn_hidden_size
    return ParamCounts(total=total, per_stage_rank=tuple(stages), matmul=num_layers * layer_matmul + embedding,
                       vocab_padded=vocab)


def attention_coefficient(arch: HFArch) -> int:
    """heads x head_dim x layers: the causal attention forward of one sequence of S tokens is
    2 x this x S^2 FLOPs (QK^T and attention x V over the lower triangle), every layer together."""
    return arch.num_attention_heads * arch.head_dim * arch.num_layers


def forward_flops(matmul_params: int, attention_coef: int, *, tokens: float, squared_lengths: float) -> float:
    """Model FLOPs of one forward over sequences holding `tokens` tokens in all, whose lengths squared sum
    to `squared_lengths`: 2 x matmul params x tokens + causal attention (`attention_coefficient`)."""
    return 2 * matmul_params * tokens + 2 * attention_coef * squared_lengths


def update_flops(matmul_params: int, attention_coef: int, *, tokens: float, squared_lengths: float,
                 epochs: int = 1) -> float:
    """Model FLOPs of training on those sequences `epochs` times: forward + backward = 3 forwards
    (6 x params x tokens + 3 x attention); full recompute's extra forward is not counted."""
    return epochs * 3 * forward_flops(matmul_params, attention_coef, tokens=tokens, squared_lengths=squared_lengths)


def trainer_state_bytes(num_params: int, *, bf16: bool, distributed_optimizer: bool, dp_cp: int) -> dict[str, int]:
    """Bytes of one trainer rank's persistent state for `num_params` parameters: weights, the fp32 grad
    buffer, the optimizer's fp32 main params (bf16 only) and Adam's two fp32 moments (sharded over DP x CP by
    the distributed optimizer)."""
    shards = dp_cp if distributed_optimizer else 1
    return {
        "weights": num_params * (2 if bf16 else 4),
        "grads": num_params * 4,
        "main_params": (num_params * 4 // shards) if bf16 else 0,
        "moments": num_params * 8 // shards,
    }


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """What the estimate assumes about the hardware and the data; each is a tools/plan.py option."""

    gpu_memory_gib: float = 80.0  # per GPU (H100 SXM 80 GB)
    # kept free: an "80 GB" H100 shows CUDA about 79.6 GiB, and allocations the table does not see need room
    reserve_gib: float = 2.0
    mfu: float = 0.35  # model-FLOPs utilization of training, old log-probs and prefill
    peak_tflops: float = 989.0  # H100 SXM dense BF16
    hbm_tbs: float = 3.35  # H100 SXM HBM3 bandwidth, TB/s
    gen_bandwidth_util: float = 0.5  # share of the HBM bandwidth a decode step achieves
    mean_prompt_frac: float = 0.25  # mean prompt = this x data.max_prompt_length
    mean_response_frac: float = 0.5  # mean response (generated or demonstration) = this x data.max_response_length


@dataclass
class Term:
    key: str
    label: str
    bytes: Optional[int]  # None: not on the GPU in this phase
    where: str = ""  # for bytes=None: "host" (offloaded), "freed" (released) or "" (not allocated)


@dataclass
class Phase:
    name: str
    gpus: str  # which GPUs: "all" (colocated), "trainer" or "rollout" (disaggregated)
    terms: list[Term] = field(default_factory=list)

    def add(self, key: str, label: str, value: Optional[float], where: str = "") -> None:
        self.terms.append(Term(key, label, None if value is None else int(value), where))

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms if t.bytes)

    def get(self, key: str) -> Optional[int]:
        for t in self.terms:
            if t.key == key:
                return t.bytes
        raise KeyError(key)


@dataclass
class Plan:
    recipe: str
    cfg: object
    assumptions: Assumptions
    arch: HFArch
    arch_source: str
    layout: dict
    params: ParamCounts
    worst_stage: int
    phases: list[Phase]
    kv: dict
    step: dict
    flops: dict
    times_s: dict
    generation: dict
    problems: list[str]
    notes: list[str]
    host: dict = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def _layout(cfg, arch: HFArch, hf_config: dict) -> dict:
    """The layout's numbers, checked as luffy-train checks them before Ray starts (`cluster.layout`'s
    `layout_problems` and `check_model_parallelism`, which config validation and the trainer's pre-flight use)
    plus what only the model's shapes decide here; PlanError lists every problem.
    Disaggregated (as `cluster.layout.plan_layout`): parallel.nnodes training nodes plus cluster.rollout_nnodes
    rollout nodes."""
    from luffy_megatron.cluster.layout import check_model_parallelism, layout_problems
    from luffy_megatron.config import ConfigError

    p, r, c, m = cfg.parallel, cfg.rollout, cfg.cluster, cfg.model
    tp, pp, cp, etp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                       r.tensor_model_parallel_size)
    vpp = p.virtual_pipeline_model_parallel_size or 1
    gpn, nnodes = p.n_gpus_per_node, p.nnodes
    mode = "colocated" if c.layout in ("auto", "colocated") else "disaggregated"  # auto on GPUs is colocated
    errors = list(layout_problems(cfg, mode))
    try:
        check_model_parallelism(cfg, hf_config)
    except ConfigError as err:  # one problem, or "N problems:" and a "  - problem" line each
        lines = str(err).splitlines()
        errors.extend([line.strip().removeprefix("- ") for line in lines[1:]] if len(lines) > 1 else lines)
    ffn, layers = arch.ffn_hidden_size, arch.num_layers
    if ffn % tp:
        errors.append(f"parallel.tensor_model_parallel_size={tp} does not divide the model's intermediate_size={ffn} "
                      f"(model.path={m.path})")
    train_gpus = nnodes * gpn
    if mode == "colocated":
        rollout_gpus = train_gpus
        num_engines = train_gpus // etp
    else:
        rollout_gpus = c.rollout_nnodes * gpn
        num_engines = r.num_engines if r.num_engines is not None else c.rollout_nnodes * (gpn // max(etp, 1))
    chunk_layers = layers // (pp * vpp) if layers % (pp * vpp) == 0 else 0
    if m.recompute_granularity == "full" and chunk_layers:
        n = m.recompute_num_layers
        if n > chunk_layers:
            errors.append(f"model.recompute_num_layers={n} exceeds the {chunk_layers} layers of a pipeline "
                          "chunk (megatron-core refuses it)")
        elif m.recompute_method == "uniform" and chunk_layers % n:
            errors.append(f"model.recompute_method=uniform: model.recompute_num_layers={n} must divide the "
                          f"{chunk_layers} layers of a pipeline chunk")
    if errors:
        raise PlanError("; ".join(errors))
    return dict(mode=mode, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=train_gpus // (tp * pp * cp), etp=etp,
                num_engines=num_engines, train_gpus=train_gpus, rollout_gpus=rollout_gpus, nnodes=nnodes,
                rollout_nnodes=c.rollout_nnodes if mode == "disaggregated" else 0, gpn=gpn,
                chunk_layers=chunk_layers)


def _layer_activation_bytes_per_token(arch: HFArch, *, tp: int, sp: bool, seq_len: int, unfused: bool,
                                      dtype_bytes: int) -> tuple[float, float]:
    """(bytes one layer keeps per token for backward, of which the attention part selective recompute drops)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    seq_split = 4 * h * dtype_bytes / (tp if sp else 1)
    tp_split = ((heads + 2 * groups) * d + heads * d + 3 * f) * dtype_bytes / tp
    attention = (heads / tp) * seq_len * dtype_bytes if unfused else 4 * heads / tp
    return seq_split + tp_split + attention, attention


def _trainer_phases_memory(cfg, arch: HFArch, lay: dict, params: ParamCounts, stage: int) -> dict:
    """Transient trainer memory of one pipeline stage, per GPU: activations of the update and of the log-prob
    forward, logits, log-prob chunk."""
    m, p, a, d = cfg.model, cfg.parallel, cfg.actor, cfg.data
    tp, pp, vpp, cp = lay["tp"], lay["pp"], lay["vpp"], lay["cp"]
    dtype_bytes = 2 if m.dtype == "bf16" else 4
    max_seq = d.max_prompt_length + d.max_response_length
    # fixed micro-batches: ppo_micro_batch_size prompts x rollout.n rows over the DP ranks (upstream's units)
    rows = max(1, micro_batch_prompts(a) * cfg.rollout.n // max(lay.get("dp", 1), 1))
    tokens = a.ppo_max_token_len_per_gpu if a.use_dynamic_bsz else rows * max_seq
    tokens = math.ceil(tokens / cp)
    unfused = m.transformer_impl == "local"
    full_b, attn_b = _layer_activation_bytes_per_token(arch, tp=tp, sp=p.sequence_parallel, seq_len=max_seq,
                                                       unfused=unfused, dtype_bytes=dtype_bytes)
    ckpt_b = arch.hidden_size * dtype_bytes / (tp if p.sequence_parallel else 1)
    layer_full = full_b * tokens
    chunk_layers = lay["chunk_layers"]
    if m.recompute_granularity == "none":
        stored_per_chunk, recompute_transient = chunk_layers * layer_full, 0.0
    elif m.recompute_granularity == "selective":
        stored_per_chunk, recompute_transient = chunk_layers * (full_b - attn_b) * tokens, attn_b * tokens
    elif m.recompute_method == "uniform":
        n = m.recompute_num_layers
        stored_per_chunk, recompute_transient = (chunk_layers // n) * ckpt_b * tokens, n * layer_full
    else:  # block: the first n layers of each chunk checkpointed, the others kept whole
        n = m.recompute_num_layers
        stored_per_chunk = n * ckpt_b * tokens + (chunk_layers - n) * layer_full
        recompute_transient = layer_full
    if vpp == 1:
        chunks_in_flight = pp - stage
    else:  # megatron's interleaved schedule: warm-up model chunks of stage s, plus the one in steady state
        chunks_in_flight = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
    last = stage == pp - 1
    head_inputs = 2 * ckpt_b * tokens if last else 0.0  # final norm and output layer inputs
    activations = chunks_in_flight * stored_per_chunk + recompute_transient + layer_full + head_inputs
    vocab_local = params.vocab_padded // tp
    logits = tokens * vocab_local * dtype_bytes if last else 0
    chunk = LOGPROB_CHUNK_COPIES * min(a.log_prob_chunk_tokens, tokens) * vocab_local * 4 if last else 0
    return dict(tokens=tokens, activations=activations, forward_workspace=layer_full, logits=logits, chunk=chunk,
                vocab_local=vocab_local, chunks_in_flight=chunks_in_flight)


def _engine_memory(cfg, arch: HFArch, lay: dict, gpu_bytes: float) -> dict:
    r, d = cfg.rollout, cfg.data
    etp = lay["etp"]
    dtype_bytes = 4 if arch.dtype == "float32" else 2
    vocab = padded_vocab_size(arch.vocab_size, 1, VLLM_VOCAB_PADDING)
    h, hd, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    per_layer = layer_params(arch, etp)
    n_embed = 1 if arch.tie_word_embeddings else 2
    weights = (arch.num_layers * per_layer + h + n_embed * math.ceil(vocab / etp) * h) * dtype_bytes
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
    activations = VLLM_MAX_NUM_BATCHED_TOKENS * dtype_bytes * (2 * h + (qkv_out + 3 * f) / etp) \
        + SAMPLER_COPIES * r.max_num_seqs * vocab * 4 + ENGINE_NON_TORCH_GIB * GIB \
        + (0 if r.enforce_eager else ENGINE_CUDA_GRAPHS_GIB * GIB)
    reservation = r.gpu_memory_utilization * gpu_bytes
    kv = reservation - weights - activations
    kv_heads_local = max(1, arch.num_query_groups // etp)
    kv_per_token = 2 * arch.num_layers * kv_heads_local * hd * dtype_bytes
    max_seq = d.max_prompt_length + d.max_response_length
    kv_tokens = max(0, int(kv // kv_per_token))
    return dict(weights=weights, activations=activations, reservation=reservation, kv=kv,
                kv_per_token=kv_per_token, kv_tokens=kv_tokens, max_seq=max_seq,
                kv_full_seqs=kv_tokens // max_seq)


def _step_rows(cfg, asm: Assumptions) -> dict:
    r, d = cfg.rollout, cfg.data
    prompts = d.train_batch_size
    rows = prompts * r.n
    off = r.n if r.n_off_policy == -1 else r.n_off_policy
    prompt_len = asm.mean_prompt_frac * d.max_prompt_length
    response_len = asm.mean_response_frac * d.max_response_length
    mean_ratio = (r.min_prefix_ratio + r.max_prefix_ratio) / 2
    prefixed = prompts * off
    on_policy = rows - prefixed
    generated_rows = on_policy + (prefixed if mean_ratio < 1 else 0)
    decode_tokens = on_policy * response_len + prefixed * (1 - mean_ratio) * response_len
    prefill_tokens = generated_rows * prompt_len + (prefixed * mean_ratio * response_len if mean_ratio < 1 else 0)
    return dict(prompts=prompts, rows=rows, off_policy_rows=prefixed, on_policy_rows=on_policy,
                generated_rows=generated_rows, prompt_len=prompt_len, response_len=response_len,
                mean_ratio=mean_ratio, decode_tokens=decode_tokens, prefill_tokens=prefill_tokens,
                tokens=rows * (prompt_len + response_len))


def _flops_and_times(cfg, arch: HFArch, lay: dict, params: ParamCounts, eng: dict, rows: dict,
                     asm: Assumptions) -> tuple[dict, dict, dict]:
    n_mm = params.matmul
    attn_coef = attention_coefficient(arch)
    seq = rows["prompt_len"] + rows["response_len"]
    squared = rows["rows"] * seq * seq
    logprob = forward_flops(n_mm, attn_coef, tokens=rows["tokens"], squared_lengths=squared)
    update = update_flops(n_mm, attn_coef, tokens=rows["tokens"], squared_lengths=squared, epochs=cfg.actor.ppo_epochs)
    ctx = rows["prompt_len"] + rows["response_len"] / 2  # mean context of a decode step
    generation = 2 * n_mm * (rows["decode_tokens"] + rows["prefill_tokens"]) \
        + 4 * attn_coef * ctx * rows["decode_tokens"]
    peak = asm.peak_tflops * 1e12
    train_rate = lay["train_gpus"] * peak * asm.mfu
    times = {"old_log_probs": logprob / train_rate, "update": update / train_rate}
    ref = logprob if uses_reference(cfg.algo) else 0.0  # the reference model's log-prob forward
    times["ref_log_probs"] = ref / train_rate

    etp, engines = lay["etp"], lay["num_engines"]
    gen: dict = {}
    if rows["generated_rows"] and engines:
        rows_per_engine = rows["generated_rows"] / engines
        seq_footprint = rows["prompt_len"] + rows["response_len"]
        kv_seqs = eng["kv_tokens"] // max(1, int(seq_footprint))
        concurrency = max(1, int(min(cfg.rollout.max_num_seqs, math.ceil(rows_per_engine), kv_seqs)))
        bandwidth = asm.hbm_tbs * 1e12 * asm.gen_bandwidth_util

        def step_s(c: int) -> float:
            read = eng["weights"] + c * ctx * eng["kv_per_token"]
            compute = c * (2 * n_mm + 4 * attn_coef * ctx) / etp / (peak * asm.mfu)
            return max(read / bandwidth, compute)

        decode_tokens_per_engine = rows["decode_tokens"] / engines
        steps = max(decode_tokens_per_engine / concurrency, cfg.data.max_response_length)
        decode_s = steps * step_s(concurrency)
        prefill_s = rows["prefill_tokens"] / engines * 2 * n_mm / (etp * peak * asm.mfu)
        gen = dict(rows_per_engine=rows_per_engine, concurrency=concurrency, kv_seqs=kv_seqs,
                   step_ms=step_s(concurrency) * 1e3, steps=steps, decode_s=decode_s, prefill_s=prefill_s,
                   tail_bound=steps == cfg.data.max_response_length,
                   kv_read_gib=concurrency * ctx * eng["kv_per_token"] / GIB)
        times["generation"] = decode_s + prefill_s
    else:
        times["generation"] = 0.0
    times["step"] = times["generation"] + times["old_log_probs"] + times["ref_log_probs"] + times["update"]
    return {"generation": generation, "old_log_probs": logprob, "ref_log_probs": ref, "update": update}, times, gen


def make_plan(cfg, assumptions: Assumptions = Assumptions(), *, recipe: str = "") -> Plan:
    """The plan of a loaded and validated Config (luffy_megatron.config.load_config)."""
    asm = assumptions
    arch, source = resolve_arch(cfg.model.path)
    lay = _layout(cfg, arch, _hf_config(cfg.model.path)[0])
    m, p, a = cfg.model, cfg.parallel, cfg.actor
    params = param_counts(arch, tp=lay["tp"], pp=lay["pp"], vocab_divisible_by=m.make_vocab_size_divisible_by)
    gpu_bytes = asm.gpu_memory_gib * GIB
    colocated = lay["mode"] == "colocated"
    eng = _engine_memory(cfg, arch, lay, gpu_bytes)
    offload = a.offload_during_rollout and colocated
    bf16 = m.dtype == "bf16"
    dp_cp = lay["dp"] * lay["cp"]

    candidates = []
    for stage in sorted({0, lay["pp"] - 1}):
        state = trainer_state_bytes(params.per_stage_rank[stage], bf16=bf16,
                                    distributed_optimizer=p.use_distributed_optimizer, dp_cp=dp_cp)
        mem = _trainer_phases_memory(cfg, arch, lay, params, stage)
        candidates.append((stage, state, mem))

    def phases_of(stage: int, state: dict, mem: dict) -> list[Phase]:
        wdt = "bf16" if bf16 else "fp32"
        shard = f"/{dp_cp}" if p.use_distributed_optimizer else "unsharded"

        def trainer_state(ph: Phase, on_host: bool) -> None:
            ph.add("weights", f"trainer weights ({wdt})", state["weights"])
            where = "host" if on_host else ""
            if uses_reference(cfg.algo):  # actor/reference.py: a frozen copy, offloaded with the optimizer
                ph.add("ref_weights", f"reference model weights ({wdt})", None if on_host else state["weights"], where)
            # cluster/offload.py releases the grad buffers (re-zeroed before each update) and copies the
            # optimizer state to host
            ph.add("grads", "trainer grad buffer (fp32)", None if on_host else state["grads"],
                   "freed" if on_host else "")
            if bf16:
                ph.add("main_params", f"optimizer main params (fp32, {shard})",
                       None if on_host else state["main_params"], where)
            ph.add("moments", f"optimizer Adam moments (fp32 x2, {shard})", None if on_host else state["moments"],
                   where)

        def trainer_transient(ph: Phase, update: bool) -> None:
            act = mem["activations"] if update else mem["forward_workspace"]
            if update:
                ph.add("activations", "activations (kept + backward workspace)", act)
            else:
                ph.add("forward_workspace", "forward workspace (one layer)", act)
            ph.add("logits", f"logits ({wdt}, "
                   f"{mem['tokens']} x {mem['vocab_local']})", mem["logits"] or None)
            ph.add("logprob_chunk", f"log-prob chunk (fp32 x{LOGPROB_CHUNK_COPIES}, "
                   f"{min(a.log_prob_chunk_tokens, mem['tokens'])} x {mem['vocab_local']})", mem["chunk"] or None)
            ph.add("slack", f"allocator slack ({ALLOCATOR_SLACK:.0%} of the three above)",
                   ALLOCATOR_SLACK * (act + mem["logits"] + mem["chunk"]))
            ph.add("trainer_process", "trainer CUDA context + NCCL", TRAINER_PROCESS_GIB * GIB)

        def engine_awake(ph: Phase) -> None:
            ph.add("engine_weights", f"engine weights (TP={lay['etp']})", eng["weights"])
            ph.add("engine_kv", "engine KV cache (rest of the reservation)", max(eng["kv"], 0))
            ph.add("engine_activations", "engine activations + workspaces", eng["activations"])
            ph.add("sync_buckets", f"weight-sync buckets (2 x {cfg.rollout.weight_sync_bucket_mb} MiB)",
                   2 * cfg.rollout.weight_sync_bucket_mb * 2**20)
            ph.add("engine_process", "engine CUDA context + NCCL", ENGINE_PROCESS_GIB * GIB)

        def engine_asleep(ph: Phase) -> None:
            ph.add("engine_weights", f"engine weights (TP={lay['etp']})", None, "host")
            ph.add("engine_process", "engine CUDA context + NCCL", ENGINE_PROCESS_GIB * GIB)

        if colocated:
            gen = Phase("sync+generate", "all")
            trainer_state(gen, offload)
            gen.add("trainer_process", "trainer CUDA context + NCCL", TRAINER_PROCESS_GIB * GIB)
            engine_awake(gen)
            phases = [gen]
            for name, update in (("log-probs", False), ("update", True)):
                ph = Phase(name, "all")
                trainer_state(ph, False)
                trainer_transient(ph, update)
                engine_asleep(ph)
                phases.append(ph)
        else:
            gen = Phase("generate", "rollout")
            engine_awake(gen)
            phases = [gen]
            for name, update in (("log-probs", False), ("update", True)):
                ph = Phase(name, "trainer")
                trainer_state(ph, False)
                trainer_transient(ph, update)
                phases.append(ph)
        return phases

    # the pipeline stage that needs the most memory in its fullest phase
    worst = max(candidates, key=lambda c: max(ph.total for ph in phases_of(*c)))
    stage, state, mem = worst
    phases = phases_of(stage, state, mem)

    rows = _step_rows(cfg, asm)
    flops, times, gen = _flops_and_times(cfg, arch, lay, params, eng, rows, asm)

    problems, notes = [], []
    usable = gpu_bytes - asm.reserve_gib * GIB
    for ph in sorted(phases, key=lambda ph: -ph.total):  # the phase most over first
        if ph.total > usable:
            problems.append(_overflow_message(cfg, ph, usable, lay, eng, asm))
    if eng["kv"] < eng["max_seq"] * eng["kv_per_token"]:
        problems.append(
            f"engine KV cache: {_gib(max(eng['kv'], 0))} GiB left of rollout.gpu_memory_utilization="
            f"{cfg.rollout.gpu_memory_utilization} x {asm.gpu_memory_gib:g} GiB after {_gib(eng['weights'])} GiB of "
            f"weights and {_gib(eng['activations'])} GiB of activations, less than one sequence of "
            f"{eng['max_seq']} tokens ({_gib(eng['max_seq'] * eng['kv_per_token'])} GiB; vLLM refuses to start); "
            "raise rollout.gpu_memory_utilization or rollout.tensor_model_parallel_size"
        )
    if m.fp8 is not None:
        notes.append(f"model.fp8={m.fp8} is not modeled: memory and FLOPs are for bf16")

    # pinned host memory per node for what sleeps or is offloaded (colocated): engine weights at sleep level 1,
    # and with actor.offload_during_rollout the optimizer state while the engines are awake (each process keeps
    # its own pinned buffers, so both count)
    host = dict(engine_weights=eng["weights"] if colocated else 0,
                trainer_state=(state["main_params"] + state["moments"]) if offload else 0)
    host["per_node"] = lay["gpn"] * (host["engine_weights"] + host["trainer_state"])
    plan = Plan(recipe=recipe, cfg=cfg, assumptions=asm, arch=arch, arch_source=source, layout=lay,
                params=params, worst_stage=stage, phases=phases, kv=eng, step=rows, flops=flops, times_s=times,
                generation=gen, problems=problems, notes=notes, host=host)
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _overflow_message(cfg, ph: Phase, usable: float, lay: dict, eng: dict, asm: Assumptions) -> str:
    """Names the largest term of a phase that does not fit and what to change for it."""
    engine_keys = {"engine_weights", "engine_kv", "engine_activations"}
    terms = [t for t in ph.terms if t.bytes and t.key not in engine_keys]
    if any(t.key in engine_keys and t.bytes for t in ph.terms):  # the reservation is one allocation
        terms.append(Term("engine_reservation", f"engine reservation (rollout.gpu_memory_utilization="
                          f"{cfg.rollout.gpu_memory_utilization} x GPU)", int(eng["reservation"])))
    largest = max(terms, key=lambda t: t.bytes)
    over = ph.total - usable
    p, m, a = cfg.parallel, cfg.model, cfg.actor
    tp = lay["tp"]
    advice = {
        "weights": f"raise parallel.tensor_model_parallel_size (now {tp}) or parallel.pipeline_model_parallel_size "
                   f"(now {lay['pp']})",
        "grads": f"raise parallel.tensor_model_parallel_size (now {tp}) or parallel.pipeline_model_parallel_size "
                 f"(now {lay['pp']}); the fp32 grad buffer is never sharded over data parallel",
        "main_params": "set parallel.use_distributed_optimizer=true" if not p.use_distributed_optimizer
                       else "add nodes (more data-parallel shards) or raise TP/PP",
        "moments": "set parallel.use_distributed_optimizer=true" if not p.use_distributed_optimizer
                   else "add nodes (more data-parallel shards) or raise TP/PP",
        "activations": ("set model.recompute_granularity=full" if m.recompute_granularity != "full"
                        else "lower model.recompute_num_layers")
                       + (", parallel.sequence_parallel=true" if not p.sequence_parallel and tp > 1 else "")
                       + f", lower actor.ppo_max_token_len_per_gpu (now {a.ppo_max_token_len_per_gpu}) or raise "
                         "parallel.tensor_model_parallel_size / context_parallel_size",
        "logits": f"raise parallel.tensor_model_parallel_size (now {tp}; logits are split over the vocabulary) or "
                  f"lower actor.ppo_max_token_len_per_gpu (now {a.ppo_max_token_len_per_gpu})",
        "logprob_chunk": f"lower actor.log_prob_chunk_tokens (now {a.log_prob_chunk_tokens})",
        "engine_reservation": _reservation_advice(cfg, ph, usable, asm.gpu_memory_gib * GIB, eng),
    }.get(largest.key, "see the table")
    return (f"{ph.name} needs {_gib(ph.total)} GiB per GPU, {_gib(over)} GiB more than the {_gib(usable)} usable "
            f"({asm.gpu_memory_gib:g} GiB less the {asm.reserve_gib:g} GiB reserve); largest term: {largest.label} = "
            f"{_gib(largest.bytes)} GiB; {advice}")


def _reservation_advice(cfg, ph: Phase, usable: float, gpu_bytes: float, eng: dict) -> str:
    others = ph.total - (eng["weights"] + max(eng["kv"], 0) + eng["activations"])
    max_util = math.floor((usable - others) / gpu_bytes * 100) / 100
    text = f"lower rollout.gpu_memory_utilization to at most {max_util:.2f}"
    if ph.gpus == "all":  # colocated
        if not cfg.actor.offload_during_rollout:
            text += (" or set actor.offload_during_rollout=true (grad buffers freed, optimizer state to host while "
                     "generating)")
        text += ", or use cluster.layout=disaggregated"
    return text


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


_WIDTH = 112  # report lines fit a README code block
_TERM_ORDER = ["weights", "ref_weights", "grads", "main_params", "moments", "activations", "forward_workspace", "logits",
               "logprob_chunk", "slack", "trainer_process", "engine_weights", "engine_kv", "engine_activations",
               "sync_buckets", "engine_process"]


def _si(n: float) -> str:
    return f"{n / 1e9:.2f} B"


def format_plan(plan: Plan) -> str:
    """The plan as text: the layout, a table of memory per GPU by phase, FLOPs and times, the verdict."""
    cfg, lay, asm, arch = plan.cfg, plan.layout, plan.assumptions, plan.arch
    p, m, a, r, d = cfg.parallel, cfg.model, cfg.actor, cfg.rollout, cfg.data
    out: list[str] = []

    def emit(tag: str, text: str) -> None:
        out.extend(textwrap.wrap(text, width=_WIDTH, initial_indent=f"{tag:<9}", subsequent_indent=" " * 9,
                                 break_on_hyphens=False) or [tag])

    nodes = lay["nnodes"] + lay["rollout_nnodes"]
    split = f" ({lay['nnodes']} training + {lay['rollout_nnodes']} rollout)" if lay["rollout_nnodes"] else ""
    out.append(f"plan for {plan.recipe or '(config)'} on {nodes} nodes{split} x {lay['gpn']} GPUs = "
               f"{nodes * lay['gpn']} GPUs of {asm.gpu_memory_gib:g} GiB")
    emit("model", f"{os.path.basename(os.path.normpath(m.path))}: {plan.arch_source}")
    tie = "tied" if arch.tie_word_embeddings else "untied"
    emit("", f"{_si(plan.params.total)} params: {arch.num_layers} layers, hidden {arch.hidden_size}, "
             f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads x {arch.head_dim}, FFN "
             f"{arch.ffn_hidden_size}, vocab {arch.vocab_size} (padded {plan.params.vocab_padded}, {tie})")
    opt = (f"distributed optimizer over DP x CP = {lay['dp'] * lay['cp']}" if p.use_distributed_optimizer
           else "optimizer state unsharded")
    vpp = f" VPP={lay['vpp']}" if lay["vpp"] > 1 else ""
    rec = m.recompute_granularity
    if rec == "full":
        rec += f" ({m.recompute_method}, {m.recompute_num_layers} layer{'s' if m.recompute_num_layers > 1 else ''})"
    stage = f"; pipeline stage {plan.worst_stage} shown (the fullest)" if lay["pp"] > 1 else ""
    emit("trainer", f"{lay['train_gpus']} GPUs: TP={lay['tp']} PP={lay['pp']}{vpp} CP={lay['cp']} DP={lay['dp']}, "
                    f"{'sequence parallel, ' if p.sequence_parallel else ''}{m.dtype}, {opt}; recompute {rec}; "
                    f"{_tokens_line(plan)}; {_si(plan.params.per_stage_rank[plan.worst_stage])} params per GPU{stage}")
    if lay["mode"] == "colocated":
        off = ("; actor.offload_during_rollout: grad buffers freed and optimizer state on the host while the "
               "engines are awake" if a.offload_during_rollout else "")
        emit("engines", f"colocated: {lay['num_engines']} engines x TP={lay['etp']} on the trainer's GPUs, "
                        f"gpu_memory_utilization {r.gpu_memory_utilization:.2f}, asleep (level 1) outside "
                        f"sync+generate{off}")
    else:
        emit("engines", f"disaggregated: {lay['num_engines']} engines x TP={lay['etp']} on "
                        f"{cfg.cluster.rollout_nnodes} rollout nodes ({lay['rollout_gpus']} GPUs), "
                        f"gpu_memory_utilization {r.gpu_memory_utilization:.2f}")
    out.append("")

    names = [ph.name + ("" if ph.gpus == "all" else f" ({ph.gpus})") for ph in plan.phases]
    labels: list[tuple[str, str]] = []
    for ph in plan.phases:
        for t in ph.terms:
            if (t.key, t.label) not in labels:
                labels.append((t.key, t.label))
    labels.sort(key=lambda kl: _TERM_ORDER.index(kl[0]))
    width = max(len(lab) for _, lab in labels) + 2
    col = max(12, *(len(n) + 2 for n in names))
    out.append("memory per GPU, GiB".ljust(width + 2) + "".join(n.rjust(col) for n in names))
    for key, label in labels:
        cells = []
        for ph in plan.phases:
            term = next((t for t in ph.terms if t.key == key and t.label == label), None)
            if term is None or (term.bytes is None and not term.where):
                cells.append("-")
            elif term.bytes is None:
                cells.append(term.where)
            else:
                cells.append(_gib(term.bytes))
        out.append(f"  {label}".ljust(width + 2) + "".join(c.rjust(col) for c in cells))
    out.append("  total".ljust(width + 2) + "".join(_gib(ph.total).rjust(col) for ph in plan.phases))
    usable = (asm.gpu_memory_gib - asm.reserve_gib) * GIB
    out.append(f"  headroom (of {asm.gpu_memory_gib:g} less {asm.reserve_gib:g} reserve)".ljust(width + 2)
               + "".join(_gib(usable - ph.total).rjust(col) for ph in plan.phases))
    kv = plan.kv
    emit("", f"the engine KV cache holds {kv['kv_tokens'] / 1e6:.2f} M tokens per GPU "
             f"({kv['kv_per_token'] // 1024} KiB per token) = {kv['kv_full_seqs']} sequences of {kv['max_seq']} tokens "
             f"(rollout.max_num_seqs {r.max_num_seqs})")
    host = plan.host
    if host.get("per_node"):
        parts = [f"{what} {_gib(n)}" for what, n in (("engine weights asleep", host["engine_weights"]),
                                                    ("offloaded optimizer state", host["trainer_state"])) if n]
        emit("", f"pinned host memory per node: {_gib(host['per_node'])} GiB ({' + '.join(parts)} GiB per GPU, "
                 f"x {lay['gpn']})")
    out.append("")

    s = plan.step
    emit("step", f"{s['prompts']} prompts x {r.n} rows = {s['rows']} rows: {s['generated_rows']} generated, "
                 f"{s['off_policy_rows']} with a demonstration (mean prefix ratio {s['mean_ratio']:.2f}); assumed "
                 f"mean lengths: prompt {s['prompt_len']:.0f} ({asm.mean_prompt_frac:g} x {d.max_prompt_length}), "
                 f"response {s['response_len']:.0f} ({asm.mean_response_frac:g} x {d.max_response_length}) tokens; "
                 f"{s['tokens'] / 1e6:.2f} M tokens per step")
    out.append(f"FLOPs and time per step at MFU {asm.mfu:g} of {asm.peak_tflops:g} TFLOP/s per GPU (model FLOPs, "
               "recompute not counted)")
    epochs = f"{a.ppo_epochs} epoch{'s' if a.ppo_epochs > 1 else ''}"
    rows_fmt = [
        ("generation", "2 x params per token + attention over the KV", plan.flops["generation"],
         plan.times_s["generation"]),
        ("old log-probs", "2 x params x tokens + attention", plan.flops["old_log_probs"],
         plan.times_s["old_log_probs"]),
        ("update", f"6 x params x tokens + attention, {epochs}", plan.flops["update"], plan.times_s["update"]),
    ]
    if plan.flops["ref_log_probs"]:
        rows_fmt.insert(2, ("ref log-probs", "the reference model, as old log-probs", plan.flops["ref_log_probs"],
                            plan.times_s["ref_log_probs"]))
    for name, how, fl, t in rows_fmt:
        out.append(f"  {name:<15}{how:<48}{fl / 1e15:10.1f} PFLOP{t:9.1f} s")
    out.append(f"  {'step':<15}{'without reward grading, weight sync, offload copies':<48}{'':16}"
               f"{plan.times_s['step']:9.1f} s")
    g = plan.generation
    if g:
        bound = "the longest response" if g["tail_bound"] else "decode tokens / concurrency"
        emit("", f"generation: {g['rows_per_engine']:.0f} rows per engine at concurrency {g['concurrency']}; a decode "
                 f"step reads {_gib(kv['weights'])} GiB of weights + {g['kv_read_gib']:.1f} GiB of KV cache at "
                 f"{asm.gen_bandwidth_util:g} x {asm.hbm_tbs:g} TB/s = {g['step_ms']:.1f} ms; {g['steps']:.0f} steps "
                 f"({bound}) = {g['decode_s']:.1f} s, prefill {g['prefill_s']:.1f} s")
    for note in plan.notes:
        emit("note", note)
    out.append("")
    if plan.fits:
        fullest = max(plan.phases, key=lambda ph: ph.total)
        out.append(f"fits: the fullest phase is {fullest.name} at {_gib(fullest.total)} of "
                   f"{asm.gpu_memory_gib - asm.reserve_gib:g} usable GiB per GPU ({asm.gpu_memory_gib:g} less "
                   f"{asm.reserve_gib:g} reserve)")
    else:
        for prob in plan.problems:
            out.extend(textwrap.wrap(f"DOES NOT FIT: {prob}", width=_WIDTH, subsequent_indent="  ",
                                     break_on_hyphens=False))
        if plan.suggestions:
            out.extend(textwrap.wrap("single changes that fit: " + "; ".join(plan.suggestions), width=_WIDTH,
                                     subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(out)


def _tokens_line(plan: Plan) -> str:
    a, lay = plan.cfg.actor, plan.layout
    per = f"{a.ppo_max_token_len_per_gpu} tokens per micro-batch" if a.use_dynamic_bsz else \
        f"{max(1, micro_batch_prompts(a) * plan.cfg.rollout.n // max(lay.get('dp', 1), 1))} rows per micro-batch"
    cp = f" (/{lay['cp']} per GPU under CP)" if lay["cp"] > 1 else ""
    return f"{per}{cp}, log-prob chunk {a.log_prob_chunk_tokens} tokens"


# --------------------------------------------------------------------------------------------------------------
# Suggestions: single changes that make a recipe fit
# --------------------------------------------------------------------------------------------------------------


def suggest_fixes(cfg, assumptions: Assumptions, limit: int = 3) -> list[str]:
    """Up to `limit` single-setting changes (as --set overrides) under which the plan fits."""
    import copy

    from luffy_megatron.config import ConfigError, validate

    arch, _ = resolve_arch(cfg.model.path)
    p, m, a, r = cfg.parallel, cfg.model, cfg.actor, cfg.rollout
    tries: list[list[tuple[str, object]]] = []
    for tp in (2, 4, 8):
        if tp > p.tensor_model_parallel_size:
            tries.append([("parallel.tensor_model_parallel_size", tp), ("parallel.sequence_parallel", True)])
    for pp in (2, 4, 8):
        if pp > p.pipeline_model_parallel_size:
            tries.append([("parallel.pipeline_model_parallel_size", pp)])
    if m.recompute_granularity != "full":
        tries.append([("model.recompute_granularity", "full"), ("model.recompute_method", "uniform"),
                      ("model.recompute_num_layers", 1)])
    if not p.use_distributed_optimizer:
        tries.append([("parallel.use_distributed_optimizer", True)])
    if not a.offload_during_rollout:
        tries.append([("actor.offload_during_rollout", True)])
    tokens = a.ppo_max_token_len_per_gpu // 2
    while tokens >= cfg.data.max_prompt_length + cfg.data.max_response_length:
        tries.append([("actor.ppo_max_token_len_per_gpu", tokens)])
        tokens //= 2
    if a.log_prob_chunk_tokens > 1024:
        tries.append([("actor.log_prob_chunk_tokens", 1024)])
    for util in (0.7, 0.6, 0.5):
        if util < r.gpu_memory_utilization:
            tries.append([("rollout.gpu_memory_utilization", util)])
    for etp in (2, 4, 8):
        if etp > r.tensor_model_parallel_size:
            tries.append([("rollout.tensor_model_parallel_size", etp)])
    found = []
    for changes in tries:
        trial = copy.deepcopy(cfg)
        for key, value in changes:
            section, name = key.split(".")
            setattr(getattr(trial, section), name, value)
        try:
            validate(trial)
            if make_plan(trial, assumptions).fits:
                found.append(" ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
                                      for k, v in changes))
        except (ConfigError, PlanError):
            continue
        if len(found) >= limit:
            break
    return found


def plan_with_suggestions(cfg, assumptions: Assumptions = Assumptions(), *, recipe: str = "") -> Plan:
    plan = make_plan(cfg, assumptions, recipe=recipe)
    if not plan.fits:
        plan.suggestions = suggest_fixes(cfg, assumptions)
    return plan

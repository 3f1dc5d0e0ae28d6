"""Will a recipe fit on the GPUs, and how long will a step take? Decided from the config alone, before any
GPU is asked for (no torch.cuda, no Ray): memory per GPU in each phase of a step, FLOPs per step and a
step-time estimate under stated `Assumptions`. `make_plan` builds the `Plan`; `perf.report` prints it.
What is modeled and assumed, term by term: docs/plan.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

from luffy_megatron.actor.batching import micro_batch_prompts
from luffy_megatron.algo.options import uses_reference
from luffy_megatron.cluster.layout import layout_problems, model_parallelism_problems, plan_layout
from luffy_megatron.models.hf_to_mcore import HFArch, padded_vocab_size
from luffy_megatron.perf.flops import (
    ParamCounts,
    PlanError,
    TrainerStateBytes,
    attention_coefficient,
    forward_flops,
    layer_params,
    load_hf_config,
    param_counts,
    resolve_arch,
    trainer_state_bytes,
    update_flops,
)
from luffy_megatron.perf.runtime_memory import (
    SyncBuffers,
    sync_buffers,
    trainer_communicators,
    trainer_process_bytes,
)
from luffy_megatron.sync.weights import resolve_transport

__all__ = [
    "GIB",
    "STATE_KEYS",
    "Assumptions",
    "Phase",
    "Plan",
    "Term",
    "colocated_offload_problem",
    "OverlapEstimate",
    "make_plan",
    "on_gpu_state_keys",
    "one_step_off_estimate",
]

GIB = 2**30

# The trainer process outside its tensors (CUDA context, one NCCL communicator per process group):
# perf/runtime_memory.py. A vLLM worker's: CUDA context and its engine-TP group.
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


def gib_str(n: float) -> str:
    return f"{n / GIB:.1f}"


# --------------------------------------------------------------------------------------------------------------
# Records
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
    # NCCL's NVLS buffers on the trainer ranks: off assumes NCCL_NVLS_ENABLE=0 in their environment
    nccl_nvls: bool = False


@dataclass(frozen=True)
class LayoutNumbers:
    """The layout's sizes (from `cluster.layout.plan_layout`) and the layers of one pipeline chunk."""

    mode: str  # "colocated" or "disaggregated"
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    engine_tp: int
    num_engines: int
    train_gpus: int
    rollout_gpus: int  # colocated: the training GPUs; disaggregated: every GPU of the rollout nodes
    nnodes: int  # training nodes
    rollout_nnodes: int  # 0 when colocated
    gpus_per_node: int
    chunk_layers: int  # layers of one pipeline chunk (0 when the layers do not split evenly)


@dataclass(frozen=True)
class TrainerMemory:
    """Transient memory of one trainer rank of one pipeline stage, bytes per GPU."""

    tokens: int  # tokens of one micro-batch on this GPU
    activations: float  # kept for backward + the backward workspace (the update)
    forward_workspace: float  # one layer (the log-prob forward)
    logits: float
    chunk: float  # the log-prob chunk
    vocab_local: int
    chunks_in_flight: int


@dataclass(frozen=True)
class EngineMemory:
    """Memory of one colocated or rollout GPU's vLLM worker, bytes."""

    weights: float
    activations: float
    cuda_graphs: float  # inside the reservation, 0 with rollout.enforce_eager
    reservation: float  # gpu_memory_utilization x the GPU
    kv: float  # the rest of the reservation (negative when nothing is left)
    kv_per_token: int
    kv_tokens: int
    max_seq: int
    kv_full_seqs: int


@dataclass(frozen=True)
class StepRows:
    """Rows and tokens of one step, at the assumed mean lengths."""

    prompts: int
    rows: int
    off_policy_rows: int
    on_policy_rows: int
    generated_rows: int
    prompt_len: float
    response_len: float
    mean_ratio: float
    decode_tokens: float
    prefill_tokens: float
    tokens: float


@dataclass(frozen=True)
class StepFlops:
    generation: float
    old_log_probs: float
    ref_log_probs: float
    update: float


@dataclass(frozen=True)
class StepTimes:
    """Seconds of each phase and of the step."""

    generation: float
    old_log_probs: float
    ref_log_probs: float
    update: float

    @property
    def trainer(self) -> float:
        """The trainer's share: old (and reference) log-probs and the update."""
        return self.old_log_probs + self.ref_log_probs + self.update

    @property
    def step(self) -> float:
        return self.generation + self.trainer


@dataclass(frozen=True)
class OverlapEstimate:
    """The steady-state step of the one-step-off mode (trainer.overlap=one_step), an estimate: the engines
    generate batch k+1 with the weights before update k while the trainer computes the log-probs and update of
    batch k; the weight sync follows when both are done."""

    generation: float
    trainer: float  # old (and reference) log-probs + update
    sync: Optional[float]  # the weight sync's seconds; None when not estimated (counted in neither step)

    @property
    def sequential(self) -> float:
        """Today's step: generation, then log-probs and update, then the sync."""
        return self.generation + self.trainer + (self.sync or 0.0)

    @property
    def step(self) -> float:
        return max(self.generation, self.trainer) + (self.sync or 0.0)

    @property
    def speedup(self) -> float:
        return self.sequential / self.step if self.step > 0 else 1.0


def one_step_off_estimate(mode: str, times: StepTimes, sync_s: Optional[float] = None) -> Optional[OverlapEstimate]:
    """The one-step-off step of a disaggregated layout; None for a colocated one, whose engines and trainer
    share the GPUs and cannot run at once."""
    if mode != "disaggregated":
        return None
    return OverlapEstimate(generation=times.generation, trainer=times.trainer, sync=sync_s)


@dataclass(frozen=True)
class GenerationEstimate:
    rows_per_engine: float
    concurrency: int
    kv_seqs: int
    step_ms: float
    steps: float
    decode_s: float
    prefill_s: float
    tail_bound: bool  # the longest response, not decode tokens / concurrency, sets the step count
    kv_read_gib: float


@dataclass(frozen=True)
class HostMemory:
    """Pinned host memory (colocated) for what is offloaded, bytes per GPU of each and per node; the engines'
    weights only at the sleep level 1 fallback (level 2 discards them)."""

    engine_weights: float  # at sleep level 1
    trainer_state: float
    per_node: float  # at sleep level 2
    per_node_level1: float


# What a process holds across phases (the rest are a phase's transients and the processes' own memory): the
# keys whose presence on a GPU the run's order decides.
STATE_KEYS = frozenset(
    {
        "weights",
        "ref_weights",
        "grads",
        "main_params",
        "moments",
        "sync_buckets",
        "engine_weights",
        "engine_kv",
        "engine_sync_buckets",
    }
)


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
    layout: LayoutNumbers
    params: ParamCounts
    worst_stage: int
    phases: list[Phase]
    engine: EngineMemory
    step: StepRows
    flops: StepFlops
    times_s: StepTimes
    generation: Optional[GenerationEstimate]  # None when nothing is generated
    problems: list[str]
    notes: list[str]
    host: HostMemory
    sync: SyncBuffers
    comms: list  # runtime_memory.Communicator: the NCCL communicators of trainer rank 0
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def overlap(self) -> Optional[OverlapEstimate]:
        """The one-step-off estimate (disaggregated layouts only); the plan estimates no sync time."""
        return one_step_off_estimate(self.layout.mode, self.times_s)

    def phase(self, name: str, gpus: Optional[str] = None) -> Phase:
        """The phase `name` (of the GPUs `gpus`: "all", "trainer" or "rollout", when both have one)."""
        return next(p for p in self.phases if p.name == name and gpus in (None, p.gpus))


def on_gpu_state_keys(phase: Phase) -> frozenset[str]:
    """The state terms (`STATE_KEYS`) of `phase` that are on the GPU."""
    return frozenset(t.key for t in phase.terms if t.key in STATE_KEYS and t.bytes is not None)


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------


def layout_numbers(cfg, arch: HFArch, hf_config: dict) -> LayoutNumbers:
    """The layout's numbers, checked as luffy-train checks them before Ray starts (`cluster.layout`'s
    `layout_problems` and `model_parallelism_problems`, which config validation and the trainer's pre-flight
    use) plus what only the model's shapes decide here; PlanError lists every problem."""
    p, c = cfg.parallel, cfg.cluster
    mode = "colocated" if c.layout in ("auto", "colocated") else "disaggregated"  # auto on GPUs is colocated
    vpp = p.virtual_pipeline_model_parallel_size or 1
    layers = arch.num_layers
    chunk_layers = (
        layers // (p.pipeline_model_parallel_size * vpp) if layers % (p.pipeline_model_parallel_size * vpp) == 0 else 0
    )
    errors = [
        *layout_problems(cfg, mode),
        *model_parallelism_problems(cfg, hf_config),
        *_shape_problems(cfg, arch, chunk_layers),
    ]
    if errors:
        raise PlanError("; ".join(errors))
    cluster = plan_layout(cfg, mode)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    gpn, train_gpus = cluster.gpus_per_node, cluster.world_size
    disaggregated = mode == "disaggregated"
    return LayoutNumbers(
        mode=mode,
        tp=tp,
        pp=pp,
        vpp=vpp,
        cp=cp,
        dp=train_gpus // (tp * pp * cp),
        engine_tp=cluster.engine_tp,
        num_engines=len(cluster.engines),
        train_gpus=train_gpus,
        rollout_gpus=c.rollout_nnodes * gpn if disaggregated else train_gpus,
        nnodes=p.nnodes,
        rollout_nnodes=c.rollout_nnodes if disaggregated else 0,
        gpus_per_node=gpn,
        chunk_layers=chunk_layers,
    )


def _shape_problems(cfg, arch: HFArch, chunk_layers: int) -> list[str]:
    """What only the model's shapes decide: TP dividing the FFN, recompute units dividing a pipeline chunk."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    errors = []
    if arch.ffn_hidden_size % tp:
        errors.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide the model's intermediate_size="
            f"{arch.ffn_hidden_size} (model.path={m.path})"
        )
    if m.recompute_granularity == "full" and chunk_layers:
        n = m.recompute_num_layers
        if n > chunk_layers:
            errors.append(
                f"model.recompute_num_layers={n} exceeds the {chunk_layers} layers of a pipeline "
                "chunk (megatron-core refuses it)"
            )
        elif m.recompute_method == "uniform" and chunk_layers % n:
            errors.append(
                f"model.recompute_method=uniform: model.recompute_num_layers={n} must divide the "
                f"{chunk_layers} layers of a pipeline chunk"
            )
    return errors


def micro_batch_rows(cfg, dp: int) -> int:
    """Rows of a fixed micro-batch: ppo_micro_batch_size prompts x rollout.n rows over the DP ranks (upstream's
    units)."""
    return max(1, micro_batch_prompts(cfg.actor) * cfg.rollout.n // max(dp, 1))


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def _layer_activation_bytes_per_token(
    arch: HFArch, *, tp: int, sp: bool, seq_len: int, unfused: bool, dtype_bytes: int
) -> tuple[float, float]:
    """(bytes one layer keeps per token for backward, of which the attention part selective recompute drops)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    seq_split = 4 * h * dtype_bytes / (tp if sp else 1)
    tp_split = ((heads + 2 * groups) * d + heads * d + 3 * f) * dtype_bytes / tp
    attention = (heads / tp) * seq_len * dtype_bytes if unfused else 4 * heads / tp
    return seq_split + tp_split + attention, attention


def _stored_per_chunk(
    m, *, chunk_layers: int, full_b: float, attn_b: float, ckpt_b: float, tokens: int
) -> tuple[float, float]:
    """(activation bytes one model chunk keeps per micro-batch, the transient of recomputing during backward)."""
    layer_full = full_b * tokens
    if m.recompute_granularity == "none":
        return chunk_layers * layer_full, 0.0
    if m.recompute_granularity == "selective":
        return chunk_layers * (full_b - attn_b) * tokens, attn_b * tokens
    n = m.recompute_num_layers
    if m.recompute_method == "uniform":
        return (chunk_layers // n) * ckpt_b * tokens, n * layer_full
    # block: the first n layers of each chunk checkpointed, the others kept whole
    return n * ckpt_b * tokens + (chunk_layers - n) * layer_full, layer_full


def trainer_memory(cfg, arch: HFArch, lay: LayoutNumbers, params: ParamCounts, stage: int) -> TrainerMemory:
    """Transient trainer memory of one pipeline stage, per GPU: activations of the update and of the log-prob
    forward, logits, log-prob chunk."""
    m, p, a, d = cfg.model, cfg.parallel, cfg.actor, cfg.data
    tp, pp, vpp = lay.tp, lay.pp, lay.vpp
    dtype_bytes = 2 if m.dtype == "bf16" else 4
    max_seq = d.max_prompt_length + d.max_response_length
    tokens = a.ppo_max_token_len_per_gpu if a.use_dynamic_bsz else micro_batch_rows(cfg, lay.dp) * max_seq
    tokens = math.ceil(tokens / lay.cp)
    full_b, attn_b = _layer_activation_bytes_per_token(
        arch,
        tp=tp,
        sp=p.sequence_parallel,
        seq_len=max_seq,
        unfused=m.transformer_impl == "local",
        dtype_bytes=dtype_bytes,
    )
    ckpt_b = arch.hidden_size * dtype_bytes / (tp if p.sequence_parallel else 1)
    layer_full = full_b * tokens
    stored_per_chunk, recompute_transient = _stored_per_chunk(
        m, chunk_layers=lay.chunk_layers, full_b=full_b, attn_b=attn_b, ckpt_b=ckpt_b, tokens=tokens
    )
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
    return TrainerMemory(
        tokens=tokens,
        activations=activations,
        forward_workspace=layer_full,
        logits=logits,
        chunk=chunk,
        vocab_local=vocab_local,
        chunks_in_flight=chunks_in_flight,
    )


def engine_memory(cfg, arch: HFArch, lay: LayoutNumbers, gpu_bytes: float) -> EngineMemory:
    r, d = cfg.rollout, cfg.data
    etp = lay.engine_tp
    dtype_bytes = 4 if arch.dtype == "float32" else 2
    vocab = padded_vocab_size(arch.vocab_size, 1, VLLM_VOCAB_PADDING)
    h, hd, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    per_layer = layer_params(arch, etp)
    n_embed = 1 if arch.tie_word_embeddings else 2
    weights = (arch.num_layers * per_layer + h + n_embed * math.ceil(vocab / etp) * h) * dtype_bytes
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
    activations = (
        VLLM_MAX_NUM_BATCHED_TOKENS * dtype_bytes * (2 * h + (qkv_out + 3 * f) / etp)
        + SAMPLER_COPIES * r.max_num_seqs * vocab * 4
        + ENGINE_NON_TORCH_GIB * GIB
    )
    cuda_graphs = 0 if r.enforce_eager else ENGINE_CUDA_GRAPHS_GIB * GIB
    reservation = r.gpu_memory_utilization * gpu_bytes
    kv = reservation - weights - activations - cuda_graphs
    kv_heads_local = max(1, arch.num_query_groups // etp)
    kv_per_token = 2 * arch.num_layers * kv_heads_local * hd * dtype_bytes
    max_seq = d.max_prompt_length + d.max_response_length
    kv_tokens = max(0, int(kv // kv_per_token))
    return EngineMemory(
        weights=weights,
        activations=activations,
        cuda_graphs=cuda_graphs,
        reservation=reservation,
        kv=kv,
        kv_per_token=kv_per_token,
        kv_tokens=kv_tokens,
        max_seq=max_seq,
        kv_full_seqs=kv_tokens // max_seq,
    )


# --------------------------------------------------------------------------------------------------------------
# Phases: what one GPU of this stage holds at each point of the run, for one pipeline stage
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StageInputs:
    """What the phases of one pipeline stage are made of."""

    stage: int
    state: TrainerStateBytes
    mem: TrainerMemory


@dataclass(frozen=True)
class _Processes:
    """What the phases share: the processes' own memory and the weight-sync buffers."""

    trainer: float  # the trainer process outside its tensors (CUDA context + NCCL)
    comms: list  # runtime_memory.Communicator of rank 0
    sync: SyncBuffers


def _add_trainer_state(ph: Phase, cfg, state: TrainerStateBytes, *, dp_cp: int, reference: bool, on_host: bool) -> None:
    bf16 = cfg.model.dtype == "bf16"
    wdt = "bf16" if bf16 else "fp32"
    shard = f"/{dp_cp}" if cfg.parallel.use_distributed_optimizer else "unsharded"
    ph.add("weights", f"trainer weights ({wdt})", state.weights)
    where = "host" if on_host else ""
    if reference:  # actor/reference.py: a frozen copy, offloaded with the optimizer
        ph.add("ref_weights", f"reference model weights ({wdt})", None if on_host else state.weights, where)
    # cluster/offload.py releases the grad buffers (re-zeroed before each update) and copies the
    # optimizer state to host
    ph.add("grads", "trainer grad buffer (fp32)", None if on_host else state.grads, "freed" if on_host else "")
    if bf16:
        ph.add("main_params", f"optimizer main params (fp32, {shard})", None if on_host else state.main_params, where)
    ph.add("moments", f"optimizer Adam moments (fp32 x2, {shard})", None if on_host else state.moments, where)


def _add_trainer_transient(ph: Phase, cfg, mem: TrainerMemory, *, update: bool) -> None:
    wdt = "bf16" if cfg.model.dtype == "bf16" else "fp32"
    act = mem.activations if update else mem.forward_workspace
    if update:
        ph.add("activations", "activations (kept + backward workspace)", act)
    else:
        ph.add("forward_workspace", "forward workspace (one layer)", act)
    ph.add("logits", f"logits ({wdt}, {mem.tokens} x {mem.vocab_local})", mem.logits or None)
    ph.add(
        "logprob_chunk",
        f"log-prob chunk (fp32 x{LOGPROB_CHUNK_COPIES}, "
        f"{min(cfg.actor.log_prob_chunk_tokens, mem.tokens)} x {mem.vocab_local})",
        mem.chunk or None,
    )
    ph.add(
        "slack",
        f"allocator slack ({ALLOCATOR_SLACK:.0%} of the three above)",
        ALLOCATOR_SLACK * (act + mem.logits + mem.chunk),
    )


def _add_trainer_process(ph: Phase, procs: _Processes, *, synced: bool) -> None:
    """The trainer's sync slots (from the first sync on, kept for the run) and the process's own memory."""
    if synced and procs.sync.trainer:
        ph.add("sync_buckets", f"weight-sync slots ({procs.sync.trainer_what})", procs.sync.trainer)
    ph.add("trainer_process", f"trainer CUDA context + NCCL ({len(procs.comms)} comms)", procs.trainer)


def _add_engine(ph: Phase, cfg, eng: EngineMemory, procs: _Processes, *, etp: int, state: str, synced: bool) -> None:
    """A vLLM worker `state`: "awake" (its whole reservation), "weights" (woken with its weights only, no KV
    cache) or "asleep" (level 2: weights discarded, KV cache dropped; the level-1 fallback keeps the weights
    on the host). CUDA graphs and runtime state come back with the weights (vLLM's non-deferrable tags)."""
    awake = state != "asleep"
    ph.add("engine_weights", f"engine weights (TP={etp})", eng.weights if awake else None, "" if awake else "freed")
    if state == "awake":
        ph.add("engine_kv", "engine KV cache (rest of the reservation)", max(eng.kv, 0))
        ph.add("engine_activations", "engine activations + workspaces", eng.activations)
    if not cfg.rollout.enforce_eager:
        ph.add("engine_cuda_graphs", "engine CUDA graphs", eng.cuda_graphs if awake else None, "" if awake else "host")
    if synced and procs.sync.engine:
        ph.add("engine_sync_buckets", "engine weight-sync receive slots", procs.sync.engine)
    ph.add("engine_process", "engine CUDA context + NCCL", ENGINE_PROCESS_GIB * GIB)


def _phases(cfg, lay: LayoutNumbers, eng: EngineMemory, inputs: _StageInputs, procs: _Processes, *, reference: bool):
    """Colocated (every GPU holds a rank and an engine worker), in the run's order: build (ranks built, nothing
    else yet), startup (ranks offloaded, engines start), resume (engines asleep, the rank's state back for the
    checkpoint load), and each step: sync (engines woken with their weights only), generate, log-probs and
    update (engines asleep). Disaggregated: the trainer GPUs and the rollout GPUs apart."""
    if lay.mode != "colocated":
        return _trainer_phases(cfg, lay, inputs, procs, reference=reference) + _rollout_phases(cfg, lay, eng, procs)
    offload = bool(cfg.actor.offload_during_rollout)
    etp, dp_cp = lay.engine_tp, lay.dp * lay.cp
    phases = []
    for name, trainer_on_host, engine, synced in (
        ("build", False, None, False),
        ("startup", offload, "awake", False),
        ("resume", False, "asleep", True),
        ("sync", offload, "weights", True),
        ("generate", offload, "awake", True),
        ("log-probs", False, "asleep", True),
        ("update", False, "asleep", True),
    ):
        ph = Phase(name, "all")
        _add_trainer_state(ph, cfg, inputs.state, dp_cp=dp_cp, reference=reference, on_host=trainer_on_host)
        if name in ("log-probs", "update"):
            _add_trainer_transient(ph, cfg, inputs.mem, update=name == "update")
        _add_trainer_process(ph, procs, synced=synced)
        if engine:
            _add_engine(ph, cfg, eng, procs, etp=etp, state=engine, synced=synced)
        phases.append(ph)
    return phases


def _trainer_phases(cfg, lay: LayoutNumbers, inputs: _StageInputs, procs: _Processes, *, reference: bool):
    """Disaggregated trainer GPUs: startup (ranks built), resume, log-probs and update; the sync runs between
    update and log-probs with the same state."""
    dp_cp = lay.dp * lay.cp
    phases = []
    for name in ("startup", "resume", "log-probs", "update"):
        ph = Phase(name, "trainer")
        _add_trainer_state(ph, cfg, inputs.state, dp_cp=dp_cp, reference=reference, on_host=False)
        if name in ("log-probs", "update"):
            _add_trainer_transient(ph, cfg, inputs.mem, update=name == "update")
        _add_trainer_process(ph, procs, synced=name != "startup")
        phases.append(ph)
    return phases


def _rollout_phases(cfg, lay: LayoutNumbers, eng: EngineMemory, procs: _Processes):
    """Disaggregated rollout GPUs: the engines stay awake (startup, resume, sync, generate); the sync's
    receive slots stay from the first sync on."""
    phases = []
    for name, synced in (("startup", False), ("resume", True), ("sync", True), ("generate", True)):
        ph = Phase(name, "rollout")
        _add_engine(ph, cfg, eng, procs, etp=lay.engine_tp, state="awake", synced=synced)
        phases.append(ph)
    return phases


# --------------------------------------------------------------------------------------------------------------
# Rows, FLOPs and time of a step
# --------------------------------------------------------------------------------------------------------------


def step_rows(cfg, asm: Assumptions) -> StepRows:
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
    return StepRows(
        prompts=prompts,
        rows=rows,
        off_policy_rows=prefixed,
        on_policy_rows=on_policy,
        generated_rows=generated_rows,
        prompt_len=prompt_len,
        response_len=response_len,
        mean_ratio=mean_ratio,
        decode_tokens=decode_tokens,
        prefill_tokens=prefill_tokens,
        tokens=rows * (prompt_len + response_len),
    )


def step_flops(cfg, arch: HFArch, params: ParamCounts, rows: StepRows, *, reference: bool) -> StepFlops:
    n_mm = params.matmul
    attn_coef = attention_coefficient(arch)
    seq = rows.prompt_len + rows.response_len
    squared = rows.rows * seq * seq
    logprob = forward_flops(n_mm, attn_coef, tokens=rows.tokens, squared_lengths=squared)
    update = update_flops(n_mm, attn_coef, tokens=rows.tokens, squared_lengths=squared, epochs=cfg.actor.ppo_epochs)
    ctx = rows.prompt_len + rows.response_len / 2  # mean context of a decode step
    generation = 2 * n_mm * (rows.decode_tokens + rows.prefill_tokens) + 4 * attn_coef * ctx * rows.decode_tokens
    ref = logprob if reference else 0.0  # the reference model's log-prob forward
    return StepFlops(generation=generation, old_log_probs=logprob, ref_log_probs=ref, update=update)


def generation_estimate(
    cfg, arch: HFArch, lay: LayoutNumbers, params: ParamCounts, eng: EngineMemory, rows: StepRows, asm: Assumptions
) -> Optional[GenerationEstimate]:
    """Decode steps that each read the engine's weight shard and the live KV cache (or compute, whichever is
    slower), for max(decode tokens / concurrency, the longest response) steps, plus prefill. None when the
    step generates nothing."""
    etp, engines = lay.engine_tp, lay.num_engines
    if not (rows.generated_rows and engines):
        return None
    n_mm, attn_coef = params.matmul, attention_coefficient(arch)
    peak = asm.peak_tflops * 1e12
    ctx = rows.prompt_len + rows.response_len / 2  # mean context of a decode step
    rows_per_engine = rows.generated_rows / engines
    seq_footprint = rows.prompt_len + rows.response_len
    kv_seqs = eng.kv_tokens // max(1, int(seq_footprint))
    concurrency = max(1, int(min(cfg.rollout.max_num_seqs, math.ceil(rows_per_engine), kv_seqs)))
    bandwidth = asm.hbm_tbs * 1e12 * asm.gen_bandwidth_util
    read = eng.weights + concurrency * ctx * eng.kv_per_token
    compute = concurrency * (2 * n_mm + 4 * attn_coef * ctx) / etp / (peak * asm.mfu)
    step_s = max(read / bandwidth, compute)
    decode_tokens_per_engine = rows.decode_tokens / engines
    steps = max(decode_tokens_per_engine / concurrency, cfg.data.max_response_length)
    decode_s = steps * step_s
    prefill_s = rows.prefill_tokens / engines * 2 * n_mm / (etp * peak * asm.mfu)
    return GenerationEstimate(
        rows_per_engine=rows_per_engine,
        concurrency=concurrency,
        kv_seqs=kv_seqs,
        step_ms=step_s * 1e3,
        steps=steps,
        decode_s=decode_s,
        prefill_s=prefill_s,
        tail_bound=steps == cfg.data.max_response_length,
        kv_read_gib=concurrency * ctx * eng.kv_per_token / GIB,
    )


def step_times(lay: LayoutNumbers, flops: StepFlops, gen: Optional[GenerationEstimate], asm: Assumptions) -> StepTimes:
    """Training and log-probs at `mfu` of `peak_tflops` on every trainer GPU; generation as estimated."""
    peak = asm.peak_tflops * 1e12
    train_rate = lay.train_gpus * peak * asm.mfu
    return StepTimes(
        generation=gen.decode_s + gen.prefill_s if gen else 0.0,
        old_log_probs=flops.old_log_probs / train_rate,
        ref_log_probs=flops.ref_log_probs / train_rate,
        update=flops.update / train_rate,
    )


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


def make_plan(cfg, assumptions: Assumptions = Assumptions(), *, recipe: str = "") -> Plan:
    """The plan of a loaded and validated Config (luffy_megatron.config.load_config)."""
    asm = assumptions
    arch, source = resolve_arch(cfg.model.path)
    lay = layout_numbers(cfg, arch, load_hf_config(cfg.model.path)[0])
    m = cfg.model
    params = param_counts(arch, tp=lay.tp, pp=lay.pp, vocab_divisible_by=m.make_vocab_size_divisible_by)
    eng = engine_memory(cfg, arch, lay, asm.gpu_memory_gib * GIB)
    reference = uses_reference(cfg.algo)
    procs = _processes(cfg, arch, lay, asm)
    candidates = [_stage_inputs(cfg, arch, lay, params, stage) for stage in sorted({0, lay.pp - 1})]
    # the pipeline stage that needs the most memory in its fullest phase
    worst = max(candidates, key=lambda c: max(ph.total for ph in _phases(cfg, lay, eng, c, procs, reference=reference)))
    phases = _phases(cfg, lay, eng, worst, procs, reference=reference)

    rows = step_rows(cfg, asm)
    flops = step_flops(cfg, arch, params, rows, reference=reference)
    gen = generation_estimate(cfg, arch, lay, params, eng, rows, asm)
    notes = [f"model.fp8={m.fp8} is not modeled: memory and FLOPs are for bf16"] if m.fp8 is not None else []
    return Plan(
        recipe=recipe,
        cfg=cfg,
        assumptions=asm,
        arch=arch,
        arch_source=source,
        layout=lay,
        params=params,
        worst_stage=worst.stage,
        phases=phases,
        engine=eng,
        step=rows,
        flops=flops,
        times_s=step_times(lay, flops, gen, asm),
        generation=gen,
        problems=_problems(cfg, phases, lay, eng, asm),
        notes=notes,
        host=_host_memory(cfg, lay, eng, worst.state, reference=reference),
        sync=procs.sync,
        comms=procs.comms,
    )


def _stage_inputs(cfg, arch: HFArch, lay: LayoutNumbers, params: ParamCounts, stage: int) -> _StageInputs:
    m, p = cfg.model, cfg.parallel
    n = params.per_stage_rank[stage]
    state = trainer_state_bytes(
        n, bf16=m.dtype == "bf16", distributed_optimizer=p.use_distributed_optimizer, dp_cp=lay.dp * lay.cp
    )
    return _StageInputs(stage, state, trainer_memory(cfg, arch, lay, params, stage))


def _processes(cfg, arch: HFArch, lay: LayoutNumbers, asm: Assumptions) -> _Processes:
    """The trainer process's own memory (its NCCL communicators) and the weight-sync buffers, in the engines'
    dtype (the sync casts to it)."""
    r, p = cfg.rollout, cfg.parallel
    colocated = lay.mode == "colocated"
    transport = resolve_transport(r.weight_sync_transport, lay.mode)
    comms = trainer_communicators(
        tp=lay.tp,
        pp=lay.pp,
        cp=lay.cp,
        dp=lay.dp,
        gpus_per_node=lay.gpus_per_node,
        distributed_optimizer=p.use_distributed_optimizer,
        tied_embeddings=arch.tie_word_embeddings,
        transport=transport,
        colocated=colocated,
        engine_tp=lay.engine_tp,
        engine_workers=lay.num_engines * lay.engine_tp,
    )
    sync = sync_buffers(
        transport, bucket_mb=r.weight_sync_bucket_mb, arch=arch, dtype_bytes=4 if arch.dtype == "float32" else 2
    )
    return _Processes(trainer_process_bytes(comms, nvls=asm.nccl_nvls), comms, sync)


def _host_memory(
    cfg, lay: LayoutNumbers, eng: EngineMemory, state: TrainerStateBytes, *, reference: bool
) -> HostMemory:
    """Pinned host memory per node for what is offloaded (colocated): with actor.offload_during_rollout the
    optimizer state (and the reference's weights) while the engines are awake, and the engines' weights while
    they sleep at level 1 (the fallback; level 2 discards them). Each process keeps its own pinned buffers."""
    colocated = lay.mode == "colocated"
    offload = cfg.actor.offload_during_rollout and colocated
    engine_weights = eng.weights if colocated else 0
    trainer_state = (state.main_params + state.moments + (state.weights if reference else 0)) if offload else 0
    return HostMemory(
        engine_weights=engine_weights,
        trainer_state=trainer_state,
        per_node=lay.gpus_per_node * trainer_state,
        per_node_level1=lay.gpus_per_node * (engine_weights + trainer_state),
    )


def _problems(cfg, phases: list[Phase], lay: LayoutNumbers, eng: EngineMemory, asm: Assumptions) -> list[str]:
    """Every phase over the usable memory (the phase most over first), and a KV cache that holds no sequence."""
    problems = []
    usable = asm.gpu_memory_gib * GIB - asm.reserve_gib * GIB
    for ph in sorted(phases, key=lambda ph: -ph.total):
        if ph.total > usable:
            problems.append(_overflow_message(cfg, ph, usable, lay, eng, asm))
    if eng.kv < eng.max_seq * eng.kv_per_token:
        problems.append(
            f"engine KV cache: {gib_str(max(eng.kv, 0))} GiB left of rollout.gpu_memory_utilization="
            f"{cfg.rollout.gpu_memory_utilization} x {asm.gpu_memory_gib:g} GiB after {gib_str(eng.weights)} GiB of "
            f"weights and {gib_str(eng.activations)} GiB of activations, less than one sequence of "
            f"{eng.max_seq} tokens ({gib_str(eng.max_seq * eng.kv_per_token)} GiB; vLLM refuses to start); "
            "raise rollout.gpu_memory_utilization or rollout.tensor_model_parallel_size"
        )
    return problems


def _overflow_message(cfg, ph: Phase, usable: float, lay: LayoutNumbers, eng: EngineMemory, asm: Assumptions) -> str:
    """Names the largest term of a phase that does not fit and what to change for it."""
    engine_keys = set(_RESERVATION_KEYS)
    terms = [t for t in ph.terms if t.bytes and t.key not in engine_keys]
    if any(t.key == "engine_kv" and t.bytes is not None for t in ph.terms):  # the reservation is one allocation
        terms.append(
            Term(
                "engine_reservation",
                f"engine reservation (rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} x GPU)",
                int(eng.reservation),
            )
        )
    else:  # woken with its weights only: the terms one by one
        terms += [t for t in ph.terms if t.bytes and t.key in engine_keys]
    largest = max(terms, key=lambda t: t.bytes)
    over = ph.total - usable
    if largest.key == "engine_reservation":
        advice = _reservation_advice(cfg, ph, usable, asm.gpu_memory_gib * GIB)
    else:
        advice = _term_advice(cfg, lay.tp, lay.pp, asm).get(largest.key, "see the table")
    return (
        f"{ph.name} needs {gib_str(ph.total)} GiB per GPU, {gib_str(over)} GiB more than the {gib_str(usable)} "
        f"usable ({asm.gpu_memory_gib:g} GiB less the {asm.reserve_gib:g} GiB reserve); largest term: "
        f"{largest.label} = {gib_str(largest.bytes)} GiB; {advice}"
    )


def _term_advice(cfg, tp: int, pp: int, asm: Assumptions) -> dict[str, str]:
    """What to change for each trainer term, by its key."""
    p, m, a, r = cfg.parallel, cfg.model, cfg.actor, cfg.rollout
    optimizer = (
        "set parallel.use_distributed_optimizer=true"
        if not p.use_distributed_optimizer
        else "add nodes (more data-parallel shards) or raise TP/PP"
    )
    sizes = f"raise parallel.tensor_model_parallel_size (now {tp}) or parallel.pipeline_model_parallel_size (now {pp})"
    return {
        "weights": sizes,
        "grads": f"{sizes}; the fp32 grad buffer is never sharded over data parallel",
        "main_params": optimizer,
        "moments": optimizer,
        "activations": (
            "set model.recompute_granularity=full"
            if m.recompute_granularity != "full"
            else "lower model.recompute_num_layers"
        )
        + (", parallel.sequence_parallel=true" if not p.sequence_parallel and tp > 1 else "")
        + f", lower actor.ppo_max_token_len_per_gpu (now {a.ppo_max_token_len_per_gpu}) or raise "
        "parallel.tensor_model_parallel_size / context_parallel_size",
        "logits": f"raise parallel.tensor_model_parallel_size (now {tp}; logits are split over the vocabulary) or "
        f"lower actor.ppo_max_token_len_per_gpu (now {a.ppo_max_token_len_per_gpu})",
        "logprob_chunk": f"lower actor.log_prob_chunk_tokens (now {a.log_prob_chunk_tokens})",
        "trainer_process": (
            "set NCCL_NVLS_ENABLE=0 for the trainer ranks (NVLS buffers per communicator)"
            if asm.nccl_nvls
            else "fewer process groups (parallel sizes of 1 make none)"
        ),
        "sync_buckets": f"lower rollout.weight_sync_bucket_mb (now {r.weight_sync_bucket_mb}; a slot is never "
        "smaller than the largest tensor)",
    }


_RESERVATION_KEYS = ("engine_weights", "engine_kv", "engine_activations", "engine_cuda_graphs")


def _reservation_advice(cfg, ph: Phase, usable: float, gpu_bytes: float) -> str:
    others = ph.total - sum(t.bytes for t in ph.terms if t.key in _RESERVATION_KEYS and t.bytes)
    max_util = math.floor((usable - others) / gpu_bytes * 100) / 100
    text = f"lower rollout.gpu_memory_utilization to at most {max_util:.2f}"
    if ph.gpus == "all":  # colocated
        if not cfg.actor.offload_during_rollout:
            text += (
                " or set actor.offload_during_rollout=true (grad buffers freed, optimizer state to host while "
                "generating)"
            )
        text += ", or use cluster.layout=disaggregated"
    return text


def colocated_offload_problem(cfg, layout, assumptions: Optional[Assumptions] = None) -> Optional[str]:
    """For the config check at start: why a colocated GPU layout does not fit without
    actor.offload_during_rollout, with the plan's numbers, or None (it fits, offload is on, the layout is not
    colocated, or the plan cannot be made for this model). `layout`: the resolved mode ("colocated",
    "disaggregated", "cpu") or anything with a `.mode` (cluster.layout.ClusterLayout)."""
    mode = getattr(layout, "mode", layout)
    if mode != "colocated" or cfg.actor.offload_during_rollout:
        return None
    asm = assumptions or Assumptions()
    try:
        plan = make_plan(cfg, asm)
    except PlanError:
        return None
    if plan.fits:
        return None
    usable = (asm.gpu_memory_gib - asm.reserve_gib) * GIB
    over = [ph for ph in sorted(plan.phases, key=lambda ph: -ph.total) if ph.total > usable]
    text = (
        "cluster.layout=colocated on GPUs without actor.offload_during_rollout does not fit: "
        + "; ".join(f"{ph.name} needs {gib_str(ph.total)} GiB per GPU" for ph in over)
        + f" of {gib_str(usable)} usable ({asm.gpu_memory_gib:g} GiB less {asm.reserve_gib:g} reserve)"
    )
    trial = copy.deepcopy(cfg)
    trial.actor.offload_during_rollout = True
    offloaded = make_plan(trial, asm)
    if offloaded.fits:
        fullest = max(offloaded.phases, key=lambda ph: ph.total)
        text += (
            f"; with actor.offload_during_rollout=true the fullest phase is {fullest.name} at "
            f"{gib_str(fullest.total)} GiB: set it"
        )
    return text + " (python tools/plan.py shows every phase)"

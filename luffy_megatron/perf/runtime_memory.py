"""Memory the plan's tensor terms do not name: the trainer process's CUDA context and NCCL communicators (one
per process group a rank belongs to), and the weight-sync buffers each transport keeps on a GPU.

None of the constants below is measured on an H100 yet; each names where its number comes from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from luffy_megatron.models.hf_to_mcore import HFArch

__all__ = [
    "CUDA_CONTEXT_GIB",
    "NCCL_IDLE_COMM_GIB",
    "NCCL_NVLS_COMM_GIB",
    "NCCL_USED_COMM_GIB",
    "Communicator",
    "SyncBuffers",
    "largest_export_tensor",
    "sync_buffers",
    "trainer_communicators",
    "trainer_process_bytes",
]

GIB = 2**30

# CUDA context of a torch process on an H100 (driver state, kernels loaded lazily, cuBLAS workspace): assumed.
CUDA_CONTEXT_GIB = 0.5
# NCCL. Every torch ProcessGroup is a communicator of its own: the world group is bound to the rank's device, so
# each group megatron makes is split from it at once (ncclCommSplit) and shares no buffers with it (NCCL shares
# them only with NCCL_COMM_SPLIT_SHARE_RESOURCES=1). Since NCCL 2.22 a communicator connects its peers and
# allocates its channel buffers at its first collective (NCCL_RUNTIME_CONNECT=1, the default), so:
#   - a communicator that runs collectives: 0.6 GiB. NVIDIA/nccl#964 measured 544 MB (2 GPUs) and 688 MB
#     (4 GPUs) per group on A100 NVLink after one all-reduce; NVIDIA/nccl#986: memory grows with the channels,
#     which H100 NVLink has more of. Unmeasured on H100.
#   - a communicator created and never used: 0.05 GiB for its own structures. Assumed, unmeasured.
#   - NVLS (NVLink SHARP on H100 NVSwitch nodes, NCCL's default there): about 1 GiB more per used communicator
#     with two or more GPUs of one node. NVIDIA/nccl#864 measured ~1.6 GB for one communicator and ~6 GB for
#     three; NVIDIA/NeMo-Framework-Launcher#127 sets NCCL_NVLS_ENABLE=0 "for memory saving". Unmeasured.
NCCL_USED_COMM_GIB = 0.6
NCCL_IDLE_COMM_GIB = 0.05
NCCL_NVLS_COMM_GIB = 1.0


@dataclass(frozen=True)
class Communicator:
    """One NCCL communicator of a trainer rank (global rank 0, which belongs to every kind of group)."""

    name: str
    size: int  # ranks (or processes) in it
    local: int  # of them on this rank's node
    used: bool  # the trainer runs collectives on it
    ranks: tuple[int, ...] = ()  # the global ranks of a megatron group (empty for the weight sync's)


def _members(dims: list[tuple[int, int]]) -> list[int]:
    """Global ranks of rank 0's group spanning `dims` (size, stride) of megatron's rank order."""
    return [sum(i * s for i, (_, s) in zip(idx, dims)) for idx in itertools.product(*(range(n) for n, _ in dims))]


def trainer_communicators(
    *,
    tp: int,
    pp: int,
    cp: int,
    dp: int,
    gpus_per_node: int,
    distributed_optimizer: bool,
    tied_embeddings: bool,
    transport: str,
    colocated: bool,
    engine_tp: int,
    engine_workers: int,
) -> list[Communicator]:
    """The NCCL communicators of rank 0 (of size >= 2): megatron-core 0.16's `initialize_model_parallel` groups
    (rank order tp-cp-ep-dp-pp; a dense model, so expert parallel is 1 and the expert groups repeat the dense
    ones), the world group, and the weight sync's: with CUDA IPC the group of the ranks serving one engine
    (`sync/shared_memory.py`), with the collective transport a sender's group with every engine worker."""
    s_cp, s_dp = tp, tp * cp
    s_pp = s_dp * dp
    world = tp * pp * cp * dp
    groups: list[tuple[str, list[int], bool]] = [
        ("data parallel with CP", _members([(cp, s_cp), (dp, s_dp)]), True),  # DDP grads, distributed optimizer
        ("data parallel", _members([(dp, s_dp)]), True),  # the actor's own reductions
        ("context parallel", _members([(cp, s_cp)]), True),
        ("model parallel (TP x PP)", _members([(tp, 1), (pp, s_pp)]), not distributed_optimizer),  # grad norm
        ("tensor parallel", _members([(tp, 1)]), True),
        ("pipeline parallel", _members([(pp, s_pp)]), True),
        ("embedding (first + last stage)", [0, (pp - 1) * s_pp] if pp > 1 else [0], tied_embeddings),
        ("TP x DP x CP", _members([(tp, 1), (cp, s_cp), (dp, s_dp)]), False),
        ("TP x DP", _members([(tp, 1), (dp, s_dp)]), False),
        ("TP x CP", _members([(tp, 1), (cp, s_cp)]), False),
        ("expert tensor parallel", _members([(tp, 1)]), False),
        ("expert TP x EP", _members([(tp, 1)]), False),
        ("expert TP x EP x PP", _members([(tp, 1), (pp, s_pp)]), False),
        ("expert data parallel", _members([(cp * dp, tp)]), False),
        ("world", list(range(world)), True),  # object collectives, barriers, the distributed optimizer's norm
    ]
    out = [
        Communicator(name, len(ranks), sum(r < gpus_per_node for r in ranks), used, tuple(ranks))
        for name, ranks, used in groups
        if len(ranks) > 1
    ]
    if transport == "shared_memory" and colocated and engine_tp > 1:
        out.append(Communicator("weight sync: the ranks of one engine", engine_tp, engine_tp, True))
    elif transport == "collective":
        local = min(1 + engine_workers, gpus_per_node) if colocated else 1
        out.append(Communicator("weight sync: sender + engine workers", 1 + engine_workers, local, True))
    return out


def trainer_process_bytes(comms: list[Communicator], *, nvls: bool) -> float:
    """CUDA context + every communicator's buffers (+ NVLS buffers where NVLS is on)."""
    total = CUDA_CONTEXT_GIB
    for c in comms:
        total += NCCL_USED_COMM_GIB if c.used else NCCL_IDLE_COMM_GIB
        if nvls and c.used and c.local > 1:
            total += NCCL_NVLS_COMM_GIB
    return total * GIB


def largest_export_tensor(arch: HFArch, dtype_bytes: int) -> tuple[int, str]:
    """(bytes, what) of the largest unit the weight export puts in a bucket: one Megatron parameter as HF tensors
    (`convert.export.plan_flat_buckets`; padding rows of the vocabulary are not sent). A unit larger than
    rollout.weight_sync_bucket_mb forms a bucket of its own."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    units = {
        f"embedding{'' if arch.tie_word_embeddings else ' / LM head'} {arch.vocab_size} x {h}": arch.vocab_size * h,
        f"MLP gate + up 2 x {f} x {h}": 2 * f * h,
        f"MLP down {h} x {f}": h * f,
        f"QKV {qkv_out} x {h}": qkv_out * h + (qkv_out if arch.qkv_bias else 0),
    }
    what = max(units, key=units.__getitem__)
    return units[what] * dtype_bytes, what


@dataclass(frozen=True)
class SyncBuffers:
    """The weight-sync buffers a transport keeps on the GPUs once the first sync has run (allocated once per
    transport and kept for the run)."""

    transport: str
    slot: int  # bytes of one slot: max(rollout.weight_sync_bucket_mb, the largest export unit)
    largest: str  # the largest export unit
    trainer: int  # bytes on a (sending) trainer GPU
    engine: int  # bytes in an engine worker, outside its vLLM reservation
    what: str  # how the transport holds them
    trainer_what: str  # what of it is on a trainer GPU


def sync_buffers(transport: str, *, bucket_mb: int, arch: HFArch, dtype_bytes: int) -> SyncBuffers:
    """shared_memory (CUDA IPC): two slots on every trainer GPU, which the engine workers map (no memory of
    their own); collective: two send slots on each sender and two receive buffers in each engine worker;
    object_store: one device buffer on each sender (the engines read from host memory)."""
    largest, what = largest_export_tensor(arch, dtype_bytes)
    slot = max(bucket_mb * 2**20, largest)
    if transport == "collective":
        return SyncBuffers(transport, slot, what, 2 * slot, 2 * slot, "2 send + 2 receive slots", "2 send slots")
    if transport == "object_store":
        return SyncBuffers(transport, slot, what, slot, 0, "1 device slot", "1 device slot")
    return SyncBuffers(transport, slot, what, 2 * slot, 0, "2 CUDA IPC slots", "2 CUDA IPC slots")

"""Streaming export of HF-named full tensors from a TP x PP (x DP) megatron-core model, as flat buckets.

A bucket is one flat byte buffer holding several HF tensors at aligned offsets, described by a small list of
`FlatEntry` (name, dtype, shape, offset). The same buffer is what the weight-sync transports move (`sync/`), so
the export writes each tensor once, where it will travel from:

* TP shards are received straight into their place in the bucket (point-to-point receives into views of the
  buffer, no gather buffer, no concatenation). The HF re-layouts are done by choosing those places:
  q/k/v are de-interleaved by sending each rank's q, k and v parts of its query groups into the q, k and v
  slots (the sender packs its parts once); gate/up go from each rank's [gate_r; up_r] halves straight into
  the gate and up slots; vocabulary rows land at their row offsets (padding rows are never sent).
  Only row-parallel weights (o_proj, down_proj: shards are column blocks) pass through a receive buffer and
  one strided copy into the bucket, because a column block of a row-major matrix is not contiguous.
* Casting to the engines' dtype happens on the owning rank before anything moves.
* Replicated tensors (norms) and this rank's own shard are copied into the bucket directly (one copy).

Two consumers:

* `iter_hf_weight_buckets` (conversion, gradients, tests): every rank of the model gets every bucket as a
  list of `(hf_name, tensor)` views. The owning pipeline stage's TP ranks exchange shards so each of them has
  the whole bucket, then the stage broadcasts the flat buffer over the pipeline group (one broadcast per
  bucket). Buffers are reused once the consumer dropped every tensor of an earlier bucket.
* the weight sync (`sync/`): `plan_flat_buckets(all_stages=False)` gives each pipeline stage the buckets of
  its own layers, and `export_flat_buckets(..., everywhere=False)` fills them on the stage's TP rank 0 only
  (into buffers the transport provides, e.g. shared memory), so every stage sends its own layers. The CUDA IPC
  sync, whose engine worker of TP rank r reads the buffer of the trainer rank on its GPU, fills every stage's
  buckets on every rank with `everywhere=True, own_shards=True` when every engine worker has the TP rank of the
  trainer rank on its GPU: the tensors vLLM splits as megatron does hold only that rank's shard, in place
  (`engine_owns_shards`).

Tied embeddings: `lm_head.weight` is never produced when `tie_word_embeddings` is true (HF and vLLM tie it
to `model.embed_tokens.weight` themselves; vLLM's loaders skip `lm_head.*` for tied models).
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from luffy_megatron.convert.names import ParamRule, global_layer_numbers, hf_shapes, rule_for
from luffy_megatron.models.hf_to_mcore import HFArch

DEFAULT_BUCKET_BYTES = 512 * 1024**2
ALIGN = 256  # byte alignment of every tensor in a flat bucket (dtype views need it; GPUs like 256)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class ExportStats:
    """Bytes the exporter itself holds, and the peak: its bucket buffers and, while a bucket is filled, the
    send/receive buffers of its TP exchange, counted as the most any rank of the owner stage needs (the
    same number on every rank: `FlatBucket.temp_bytes`)."""

    live_bytes: int = 0
    peak_bytes: int = 0
    exported_bytes: int = 0
    num_tensors: int = 0
    num_buckets: int = 0
    tp_recv_bytes: int = 0  # bytes this rank received from its TP peers while filling buckets
    tp_send_bytes: int = 0  # bytes this rank sent to its TP peers
    pp_broadcast_bytes: int = 0  # bucket bytes this rank sent or received in the pipeline broadcast

    def hold(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


@dataclass(frozen=True)
class FlatEntry:
    """One HF tensor inside a flat bucket buffer."""

    name: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * _NAME_DTYPES[self.dtype].itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view of the uint8 buffer `flat` (no copy)."""
        return flat[self.offset : self.offset + self.nbytes].view(_NAME_DTYPES[self.dtype]).view(self.shape)

    def to_wire(self) -> list:
        """Plain lists and strings only (what vLLM's RPC encoder passes through unchanged)."""
        return [self.name, self.dtype, list(self.shape), self.offset]

    @classmethod
    def from_wire(cls, w) -> "FlatEntry":
        return cls(str(w[0]), str(w[1]), tuple(int(s) for s in w[2]), int(w[3]))


def views_of(flat: torch.Tensor, entries) -> list[tuple[str, torch.Tensor]]:
    """(name, view) for wire or `FlatEntry` entries of the buffer `flat`."""
    out = []
    for e in entries:
        e = e if isinstance(e, FlatEntry) else FlatEntry.from_wire(e)
        out.append((e.name, e.view(flat)))
    return out


@dataclass
class _Item:
    """One megatron parameter and its HF tensors; `rule`/`local` only on ranks of the owning stage."""

    key: tuple
    owner: int  # pipeline stage that holds it
    shapes: list  # [(hf_name, shape)]
    dtype: str
    rule: Optional[ParamRule] = None
    local: Optional[torch.Tensor] = None  # this TP rank's shard (the exported value, e.g. a gradient)


@dataclass
class FlatBucket:
    """The plan of one bucket: which parameters fill it and where each HF tensor lies."""

    owner: int
    items: list = field(default_factory=list)
    entries: list = field(default_factory=list)  # FlatEntry
    nbytes: int = 0  # buffer bytes (aligned offsets)
    tensor_bytes: int = 0  # bytes of the tensors themselves
    temp_bytes: int = 0  # upper bound of the send/receive buffers one rank of the owner stage needs to fill it

    def wire_entries(self) -> list:
        return [e.to_wire() for e in self.entries]


def _as_chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def local_export_rules(model_chunks, arch: HFArch) -> list[tuple[ParamRule, int, torch.nn.Parameter]]:
    """(rule, chunk index, parameter) for every parameter of this rank that has HF tensors."""
    out = []
    for ci, chunk in enumerate(_as_chunks(model_chunks)):
        layer_map = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            if arch.tie_word_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            rule = rule_for(name, layer_map)
            if rule is not None:
                out.append((rule, ci, param))
    return out


def plan_flat_buckets(
    model_chunks,
    arch: HFArch,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: Optional[torch.dtype] = None,
    tensor_of: Optional[Callable] = None,
    all_stages: bool = True,
) -> list[FlatBucket]:
    """The buckets of the export in HF checkpoint order. A bucket holds the tensors of whole parameters of one
    pipeline stage, at most `bucket_bytes` of them (a larger parameter forms its own bucket).

    `all_stages`: every stage's buckets, the same list on every rank (collective over the pipeline group, an
    exchange of names and shapes only); otherwise only this stage's own buckets (no communication)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    value = tensor_of or (lambda p: p)
    local = {}
    for rule, _, param in local_export_rules(model_chunks, arch):
        local[rule.order_key] = (rule, value(param).detach())
    mine = [
        (
            key,
            pp_rank,
            hf_shapes(rule, arch),
            _DTYPE_NAMES[dtype or t.dtype],
            rule.kind,
            rule.tp_dim,
            _DTYPE_NAMES[t.dtype],
        )
        for key, (rule, t) in local.items()
    ]
    if all_stages and pp > 1:
        gathered: list = [None] * pp
        dist.all_gather_object(gathered, mine, group=ps.get_pipeline_model_parallel_group())
        plan = sorted((e for stage in gathered for e in stage), key=lambda e: e[0])
    else:
        plan = sorted(mine, key=lambda e: e[0])

    tp = ps.get_tensor_model_parallel_world_size()
    buckets: list[FlatBucket] = []
    cur: Optional[FlatBucket] = None
    for key, owner, shapes, dtype_name, kind, tp_dim, source_dtype in plan:
        item_bytes = sum(prod(shape) for _, shape in shapes) * _NAME_DTYPES[dtype_name].itemsize
        if cur is None or cur.owner != owner or (cur.items and cur.tensor_bytes + item_bytes > bucket_bytes):
            cur = FlatBucket(owner=owner)
            buckets.append(cur)
        rule, t = local.get(key, (None, None)) if owner == pp_rank else (None, None)
        cur.items.append(_Item(key, owner, [(n, tuple(s)) for n, s in shapes], dtype_name, rule, t))
        for name, shape in shapes:
            entry = FlatEntry(name, dtype_name, tuple(shape), _align(cur.nbytes))
            cur.entries.append(entry)
            cur.nbytes = entry.offset + entry.nbytes
        cur.tensor_bytes += item_bytes
        if tp > 1 and tp_dim is not None:  # what _pieces makes travel through extra buffers
            packed = kind == "qkv" or source_dtype != dtype_name  # the sender's shard, packed or cast
            cur.temp_bytes += (item_bytes // tp if packed else 0) + (item_bytes * (tp - 1) // tp if tp_dim == 1 else 0)
    for b in buckets:
        b.nbytes = _align(b.nbytes)
    return buckets


# ---------------------------------------------------------------- the weight sync's buffers

SYNC_SLOTS = 2  # bucket buffers a sender uses at once: bucket k+1 is filled while the engines read bucket k
_UNSPLIT_PARAMS = (  # the megatron parameters whose HF tensors are the largest units a bucket never splits
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
)


def sync_slot_bytes(buckets) -> int:
    """The bytes one sync buffer (slot) needs for a bucket plan (`plan_flat_buckets`): its largest bucket. A
    parameter larger than the bucket size forms a bucket of its own, so this is max(bucket size, largest
    parameter), aligned, and not the bucket size (the embedding of a 150k vocabulary is 1-1.5 GiB in bf16)."""
    return max((int(b.nbytes) for b in buckets), default=0)


def largest_export_bytes(arch: HFArch, itemsize: int = 2) -> int:
    """The largest unit the bucket planner never splits, from the architecture alone: one megatron parameter's
    HF tensors together (the embedding; q, k and v; gate and up; ...), each aligned as in a bucket, in a dtype
    of `itemsize` bytes."""
    return max(
        sum(_align(prod(shape) * int(itemsize)) for _, shape in hf_shapes(rule_for(name), arch))
        for name in _UNSPLIT_PARAMS
    )


def sync_buffer_bytes(bucket_bytes: int, largest_bytes: int, slots: int = SYNC_SLOTS) -> int:
    """What a sender's sync buffers hold, from sizes alone (the memory plan's term): `slots` x max(bucket size,
    largest unsplit parameter, `largest_export_bytes`). A plan's own slots (`sync_slot_bytes`) are at most this
    plus ALIGN bytes per tensor of a full bucket."""
    return int(slots) * max(int(bucket_bytes), int(largest_bytes))


# ---------------------------------------------------------------- filling one bucket

SELF = -1  # a piece every receiving rank takes from its own copy (replicated parameters)


@dataclass
class _Piece:
    src: int  # TP rank holding it, or SELF
    get: Callable[[torch.Tensor], torch.Tensor]  # the piece, from the source rank's local shard
    dst: Callable[[dict], torch.Tensor]  # its place in a receiver's bucket (views by HF name)
    hf: str = ""  # the HF tensor it is part of


def _pieces(item: _Item, arch: HFArch, tp: int, local_shape: tuple) -> list[_Piece]:
    """How the HF tensors of `item` are assembled from TP shards (the same list on every TP rank)."""
    rule = item.rule
    names = [n for n, _ in item.shapes]
    if rule.tp_dim is None:
        return [_Piece(SELF, lambda t: t, lambda s, n=names[0]: s[n], names[0])]
    if rule.kind == "qkv":
        groups, d = arch.num_query_groups, arch.head_dim
        qpg = arch.num_attention_heads // groups
        gr, rest = groups // tp, tuple(local_shape[1:])
        q, k, v = names
        pieces = []
        for r in range(tp):
            pieces += [
                _Piece(
                    r,
                    lambda t: t.view(gr, qpg + 2, d, *rest)[:, :qpg],
                    lambda s, r=r: s[q].view(tp, gr, qpg, d, *rest)[r],
                    q,
                ),
                _Piece(
                    r,
                    lambda t: t.view(gr, qpg + 2, d, *rest)[:, qpg],
                    lambda s, r=r: s[k].view(tp, gr, d, *rest)[r],
                    k,
                ),
                _Piece(
                    r,
                    lambda t: t.view(gr, qpg + 2, d, *rest)[:, qpg + 1],
                    lambda s, r=r: s[v].view(tp, gr, d, *rest)[r],
                    v,
                ),
            ]
        return pieces
    if rule.kind == "fc1":
        half, rest = local_shape[0] // 2, tuple(local_shape[1:])
        gate, up = names
        pieces = []
        for r in range(tp):
            pieces += [
                _Piece(r, lambda t: t[:half], lambda s, r=r: s[gate].view(tp, half, *rest)[r], gate),
                _Piece(r, lambda t: t[half:], lambda s, r=r: s[up].view(tp, half, *rest)[r], up),
            ]
        return pieces
    name, shape = item.shapes[0]
    if rule.tp_dim == 0:  # vocabulary rows (padding rows stay behind), or any row-split tensor
        rows, total = local_shape[0], shape[0]
        pieces = []
        for r in range(tp):
            n = max(0, min(rows, total - r * rows))
            if n:
                pieces.append(
                    _Piece(r, lambda t, n=n: t[:n], lambda s, r=r, n=n: s[name][r * rows : r * rows + n], name)
                )
        return pieces
    if rule.tp_dim == 1:  # row-parallel: each shard is a block of columns
        cols = local_shape[1]
        return [
            _Piece(r, lambda t: t, lambda s, r=r: s[name].view(shape[0], tp, cols, *shape[2:])[:, r], name)
            for r in range(tp)
        ]
    raise ValueError(f"no export layout for {rule.mcore_name} (kind {rule.kind}, TP dim {rule.tp_dim})")


# ---------------------------------------------------------------- the inference engine's TP shards


def _layer_suffix(hf_name: str) -> str:
    return hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name


def engine_tp_slice(hf_name: str, arch: HFArch, tp: int, rank: int) -> Optional[tuple[int, int, int]]:
    """The part of the full HF tensor `hf_name` that vLLM's weight loader keeps on TP rank `rank` of `tp`, as
    `Tensor.narrow` arguments (dim, start, length); None where the loader takes the whole tensor (replicated
    tensors, or TP 1), where vLLM could not split it (sizes not divisible), and for the vocabulary, which vLLM
    splits its own way (`VocabParallelEmbedding` pads the vocabulary to a multiple of 64 and narrows at its
    `shard_indices`, vocab_parallel_embedding.py:36,481-518, where megatron pads to a multiple of
    make_vocab_size_divisible_by x TP).

    Read from vLLM 0.32.0's source (model_executor/layers/linear.py and model_executor/parameter.py). Unquantized
    linear weights load through `weight_loader_v2` (linear.py:49-50,525-529), biases through `weight_loader`
    (linear.py:538-544); a parameter's `tp_rank` is its layer's (linear.py:306-321).
    - q_proj: QKVParallelLinear keeps num_heads = heads / tp heads (linear.py:1052); q is narrowed on dim 0 at
      tp_rank x num_heads x head_dim (linear.py:1088-1104,1180-1196 -> parameter.py:175-198; biases
      linear.py:1269-1307).
    - k_proj, v_proj: num_kv_heads = kv_heads / tp, or 1 with num_kv_head_replicas = tp / kv_heads when
      tp >= kv_heads (linear.py:1053-1058); narrowed at (tp_rank // num_kv_head_replicas) x num_kv_heads x
      head_dim (parameter.py:191-195, linear.py:1300-1307).
    - gate_proj, up_proj: MergedColumnParallelLinear narrows output_sizes[i] / tp rows at tp_rank x that
      (linear.py:954-957 -> parameter.py:153-173).
    - o_proj, down_proj: RowParallelLinear narrows dim 1 (input_dim) at tp_rank x in_features / tp
      (parameter.py:216-226; biases are replicated, linear.py:1735-1743 with no input_dim)."""
    if tp <= 1:
        return None
    suffix = _layer_suffix(hf_name)
    base = suffix.rsplit(".", 1)[0]
    heads, kv, d, ffn = arch.num_attention_heads, arch.num_query_groups, arch.head_dim, arch.ffn_hidden_size
    if base == "self_attn.q_proj" and heads % tp == 0:
        return (0, rank * heads // tp * d, heads // tp * d)
    if base in ("self_attn.k_proj", "self_attn.v_proj"):
        if tp >= kv and tp % kv == 0:
            return (0, rank // (tp // kv) * d, d)
        if tp < kv and kv % tp == 0:
            return (0, rank * kv // tp * d, kv // tp * d)
        return None
    if base in ("mlp.gate_proj", "mlp.up_proj") and ffn % tp == 0:
        return (0, rank * ffn // tp, ffn // tp)
    if suffix == "self_attn.o_proj.weight" and heads % tp == 0:
        return (1, rank * heads // tp * d, heads // tp * d)
    if suffix == "mlp.down_proj.weight" and ffn % tp == 0:
        return (1, rank * ffn // tp, ffn // tp)
    return None


def _layout(t: torch.Tensor) -> tuple:
    """Which elements of its storage a view covers, in order: the offset and the (size, stride) pairs with size-1
    dimensions dropped and contiguous neighbours merged (two views with equal layouts cover the same elements)."""
    if t.numel() == 0:
        return ("empty",)
    merged: list = []
    for n, st in zip(t.shape, t.stride()):
        if n == 1:
            continue
        if merged and merged[-1][1] == n * st:
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return (t.storage_offset(), tuple(merged))


@functools.lru_cache(maxsize=256)
def _engine_split_matches(kind: str, tp_dim: Optional[int], shapes: tuple, local_shape: tuple, arch: HFArch, tp: int):
    """Whether, for every TP rank r, rank r's pieces (`_pieces`) of each HF tensor of a parameter are exactly the
    part vLLM's loader keeps on its TP rank r (`engine_tp_slice`): compared as views of meta tensors."""
    if tp <= 1 or tp_dim is None or (kind == "qkv" and arch.num_query_groups % tp):
        return False  # (megatron splits query groups, so it cannot hold fewer than one per rank)
    names = tuple(n for n, _ in shapes)
    item = _Item((), 0, list(shapes), "", ParamRule("", kind, names, tp_dim, None))
    pieces = _pieces(item, arch, tp, local_shape)
    full = {n: torch.empty(shape, device="meta") for n, shape in shapes}
    for r in range(tp):
        for name in names:
            region = engine_tp_slice(name, arch, tp, r)
            mine = [p for p in pieces if p.src == r and p.hf == name]
            if region is None or len(mine) != 1 or _layout(mine[0].dst(full)) != _layout(full[name].narrow(*region)):
                return False
    return True


def engine_owns_shards(item: _Item, arch: HFArch, tp: int) -> bool:
    """Whether the TP split of `item`'s HF tensors is the inference engine's for the same TP size (column-
    parallel q/k/v, gate/up and their biases; row-parallel o_proj and down_proj): then TP rank r's shard, in
    place, is all that the engine worker of TP rank r reads of them."""
    shapes = tuple((_layer_suffix(n), tuple(s)) for n, s in item.shapes)
    return _engine_split_matches(item.rule.kind, item.rule.tp_dim, shapes, tuple(item.local.shape), arch, tp)


def _own_pieces(item: _Item, arch: HFArch, tp: int, me: int, *, replicated: bool) -> list[_Piece]:
    """The pieces of `item` that TP rank `me` writes into place from its own copy: its shard, and the replicated
    tensors when `replicated` (the placement every TP rank writing into the same buffer uses)."""
    return [
        p for p in _pieces(item, arch, tp, tuple(item.local.shape)) if p.src == me or (p.src == SELF and replicated)
    ]


def _fill_shared(bucket: FlatBucket, out: Optional[torch.Tensor], arch: HFArch, tp: int, me: int, group) -> None:
    """`fill_flat_bucket(shared=True)`: every TP rank writes its own pieces into its mapping of the same memory."""
    if out is None or out.numel() < bucket.nbytes:
        raise ValueError(
            f"shared bucket buffer of {None if out is None else out.numel()} bytes; the bucket needs {bucket.nbytes}"
        )
    slots = {e.name: e.view(out) for e in bucket.entries}
    if group is not None:
        dist.barrier(group=group)  # TP rank 0 has waited until the buffer's readers are done
    for item in bucket.items:
        for piece in _own_pieces(item, arch, tp, me, replicated=me == 0):
            piece.dst(slots).copy_(piece.get(item.local))
    if group is not None:
        dist.barrier(group=group)


def fill_flat_bucket(
    bucket: FlatBucket,
    out: Optional[torch.Tensor],
    arch: HFArch,
    *,
    root_only: bool,
    shared: bool = False,
    own_shards: bool = False,
    stats: Optional[ExportStats] = None,
) -> None:
    """Writes the HF tensors of `bucket` into the uint8 buffer `out`. Collective over the TP group of the
    bucket's owner stage (only its ranks call it). `root_only`: only TP rank 0 receives (`out` None elsewhere);
    otherwise every TP rank gets the whole bucket. `shared`: `out` is, on every TP rank, its own mapping of the
    same shared memory; each rank writes its own shards into place (TP rank 0 the replicated tensors too), with
    no exchange, between two barriers of the TP group (the buffer is free; every part is in). `own_shards`
    (every TP rank receives): the tensors split across TP ranks as the inference engine splits them
    (`engine_owns_shards`) are not exchanged: each rank writes only its own shard of them into place, and the
    rest of their bytes in `out` stay as they were; every other tensor is whole, as without it. `stats` counts
    the bytes sent and received over the TP group."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    me = ps.get_tensor_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    ranks = dist.get_process_group_ranks(group) if group is not None else [0]
    stats = stats if stats is not None else ExportStats()
    if shared:
        _fill_shared(bucket, out, arch, tp, me, group)
        return
    if own_shards and root_only:
        raise ValueError("own_shards fills every TP rank's buffer (root_only=False)")
    receivers = [0] if root_only else list(range(tp))
    receiving = me in receivers
    if receiving and (out is None or out.numel() < bucket.nbytes):
        raise ValueError(
            f"bucket buffer of {None if out is None else out.numel()} bytes; the bucket needs {bucket.nbytes}"
        )
    slots = {e.name: e.view(out) for e in bucket.entries} if receiving else {}

    ops, local_copies, post_copies = [], [], []
    tag = 0
    for item in bucket.items:
        want = _NAME_DTYPES[item.dtype]
        local = item.local
        if own_shards and engine_owns_shards(item, arch, tp):  # the same answer on every TP rank
            local_copies += [(p.dst(slots), p.get(local)) for p in _own_pieces(item, arch, tp, me, replicated=False)]
            continue
        for piece in _pieces(item, arch, tp, tuple(local.shape)):
            tag += 1
            if piece.src == SELF or piece.src == me:
                if receiving:
                    local_copies.append((piece.dst(slots), piece.get(local)))
                if piece.src == me:
                    peers = [r for r in receivers if r != me]
                    if peers:
                        send = piece.get(local)
                        if send.dtype != want or not send.is_contiguous():  # pack (and cast) once
                            send = send.to(want).contiguous()
                        for r in peers:
                            ops.append(dist.P2POp(dist.isend, send, ranks[r], group, tag))
                        stats.tp_send_bytes += send.numel() * send.element_size() * len(peers)
            elif receiving:
                dst = piece.dst(slots)
                stats.tp_recv_bytes += dst.numel() * want.itemsize
                if dst.is_contiguous():
                    ops.append(dist.P2POp(dist.irecv, dst, ranks[piece.src], group, tag))
                else:
                    tmp = torch.empty(dst.shape, dtype=want, device=dst.device)
                    ops.append(dist.P2POp(dist.irecv, tmp, ranks[piece.src], group, tag))
                    post_copies.append((dst, tmp))
    reqs = dist.batch_isend_irecv(ops) if ops else []
    for dst, src in local_copies:  # while the shards travel
        dst.copy_(src)
    for req in reqs:
        req.wait()
    for dst, tmp in post_copies:
        dst.copy_(tmp)


class _BufferPool:
    """Bucket buffers for `iter_hf_weight_buckets`: a buffer is reused once no tensor handed out from it is
    alive any more (its storage has no other user), else a new one is made; at most `keep` are held."""

    SETTLE_S = 0.05  # gloo's worker thread drops its references to a finished op's tensors just after it ends

    def __init__(self, device, stats: ExportStats, keep: int = 2):
        self.device, self.stats, self.keep = device, stats, keep
        # (buffer, storage use count when unused, weak references to the tensors handed out from it)
        self.buffers: list[list] = []

    @staticmethod
    def _uses(buf: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)

    def _free(self, entry) -> bool:
        buf, idle, handed = entry
        if any(ref() is not None for ref in handed):
            return False  # the consumer still holds one of its tensors
        deadline = time.monotonic() + self.SETTLE_S
        while self._uses(buf) > idle:  # a view derived from one, or a communication op finishing
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def get(self, nbytes: int) -> torch.Tensor:
        for entry in self.buffers:
            if entry[0].numel() >= nbytes and self._free(entry):
                entry[2] = []
                return entry[0]
        if len(self.buffers) >= self.keep:  # let go of one (in the consumer's hands, or too small)
            free = [i for i, e in enumerate(self.buffers) if self._free(e)]
            buf = self.buffers.pop(free[0] if free else 0)[0]
            self.stats.release(buf.numel())
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.buffers.append([buf, self._uses(buf), []])
        self.stats.hold(nbytes)
        return buf

    def handed_out(self, buf: torch.Tensor, tensors) -> None:
        for entry in self.buffers:
            if entry[0] is buf:
                entry[2] = [weakref.ref(t) for t in tensors]

    def close(self) -> None:
        for entry in self.buffers:
            self.stats.release(entry[0].numel())
        self.buffers = []


def export_flat_buckets(
    buckets: list[FlatBucket],
    arch: HFArch,
    buffer_for: Callable[[FlatBucket], Optional[torch.Tensor]],
    *,
    everywhere: bool,
    stats: Optional[ExportStats] = None,
    shared: bool = False,
    own_shards: bool = False,
) -> Iterator[tuple[FlatBucket, Optional[torch.Tensor]]]:
    """Fills `buckets` one after the other, yielding (bucket, buffer). `buffer_for(bucket)` gives the uint8
    buffer to fill (called just before the bucket is filled, so a caller can wait there until a buffer is free).

    `everywhere`: `buckets` are every stage's (`plan_flat_buckets(all_stages=True)`) and every rank of the
    model ends with each whole bucket (TP exchange on the owner stage, then a broadcast over the pipeline
    group). Otherwise `buckets` are this stage's own and only its TP rank 0 receives them: `buffer_for` is
    called there only, and other TP ranks get (bucket, None) after contributing their shards. `shared` (with
    this stage's own buckets): `buffer_for` is called on every TP rank and gives each its mapping of the same
    shared memory, into which each writes its own shards (`fill_flat_bucket(shared=True)`). `own_shards` (with
    `everywhere`): the tensors that the inference engine splits across TP ranks as megatron does
    (`engine_owns_shards`) are not gathered: every rank's buffer holds its own TP rank's shard of them in place
    (its stage's shard from its own rank, another stage's from the same TP rank there, through the pipeline
    broadcast), and the rest of their bytes are left as they were; all other tensors are whole."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    stats = stats if stats is not None else ExportStats()
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    root = ps.get_tensor_model_parallel_rank() == 0
    pp_group = ps.get_pipeline_model_parallel_group() if pp > 1 else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_group is not None else None
    for bucket in buckets:
        if bucket.owner != pp_rank and not everywhere:
            raise ValueError(
                f"bucket of stage {bucket.owner} on stage {pp_rank}: pass this stage's own buckets "
                "(plan_flat_buckets(all_stages=False))"
            )
        if shared and everywhere:
            raise ValueError("a shared bucket buffer is filled by the owner stage's TP group only (everywhere=False)")
        if own_shards and not everywhere:
            raise ValueError("own_shards fills every rank's buffer (everywhere=True)")
        buf = buffer_for(bucket) if (everywhere or root or shared) else None
        stats.hold(bucket.temp_bytes)
        try:
            if bucket.owner == pp_rank:
                fill_flat_bucket(
                    bucket, buf, arch, root_only=not everywhere, shared=shared, own_shards=own_shards, stats=stats
                )
            if everywhere and pp_ranks is not None:  # to the same TP rank of every other stage
                dist.broadcast(buf[: bucket.nbytes], src=pp_ranks[bucket.owner], group=pp_group)
                stats.pp_broadcast_bytes += bucket.nbytes
        finally:
            stats.release(bucket.temp_bytes)
        stats.num_buckets += 1
        stats.num_tensors += len(bucket.entries)
        stats.exported_bytes += bucket.tensor_bytes
        yield bucket, buf


def iter_hf_weight_buckets(
    model_chunks,
    arch: HFArch,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: Optional[torch.dtype] = None,
    stats: Optional[ExportStats] = None,
    tensor_of=None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yields lists of `(hf_name, full_tensor)` in HF checkpoint order, on every rank.

    Collective: every rank of the TP x PP model group (all DP replicas independently) must drain
    the generator. `model_chunks` is this rank's GPTModel or its list of virtual-PP chunks.
    `dtype` casts on the owning rank (before anything moves). The tensors are views of one bucket buffer,
    reused for a later bucket only once every tensor of it was dropped: keep them as long as needed.
    `tensor_of(param)` exports another tensor of each parameter's shape instead of its value (e.g. its
    reduced gradient `param.main_grad`, in fp32 even when the parameter is bf16)."""
    stats = stats if stats is not None else ExportStats()
    buckets = plan_flat_buckets(
        model_chunks, arch, bucket_bytes=bucket_bytes, dtype=dtype, tensor_of=tensor_of, all_stages=True
    )
    device = next((it.local.device for b in buckets for it in b.items if it.local is not None), torch.device("cpu"))
    pool = _BufferPool(device, stats)
    try:
        for bucket, buf in export_flat_buckets(
            buckets, arch, lambda b: pool.get(b.nbytes), everywhere=True, stats=stats
        ):
            tensors = [(e.name, e.view(buf)) for e in bucket.entries]
            pool.handed_out(buf, [t for _, t in tensors])
            del buf
            yield tensors
            del tensors
    finally:
        pool.close()


def iter_hf_weights(model_chunks, arch: HFArch, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, full_tensor)` pairs, one at a time (buckets flattened)."""
    for bucket in iter_hf_weight_buckets(model_chunks, arch, **kwargs):
        yield from bucket

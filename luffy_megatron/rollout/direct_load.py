"""Direct weight loads for vLLM-CPU engines: received tensors straight into vLLM's kernel format.

Runs inside vLLM's worker processes (called from `worker_extension.py`). Why it exists: on CPU, vLLM's
linear layers keep no weight after loading. `UnquantizedLinearMethod.process_weights_after_loading` packs
the weight for the GEMM kernel (a oneDNN handle, or sgl's packed weight; `dispatch_cpu_unquantized_gemm`,
vllm-cpu 0.32) and replaces the Parameter with an empty one, so vLLM's own in-place reload
(`model_loader.reload.layerwise`) must, on every sync, materialise each layer afresh in checkpoint format,
copy the received tensors into it through the weight loaders (fusing q/k/v and gate/up), re-run the
post-processing and swap the result in. Measured on one core for a 163.6 MB fp32 model: 0.060 s per reload,
of which the packing 0.030 s, the loaders' copies 0.012 s, the rest Python (tools/bench/sync.py).

A direct load hands the same post-processing the received tensor itself. The q/k/v (gate/up) tensors of one
layer lie back to back in a flat bucket (the export writes them in the order of the model's
`packed_modules_mapping`, at 256-byte aligned offsets that leave no gap for these sizes), so the fused weight
is a view of the bucket and packing reads the bucket in place: one copy per byte, the packing's own. Tensors
that are not adjacent are concatenated first (one more copy). Everything that keeps a Parameter (norms,
embeddings, biases, `lm_head`) is copied into it, as the weight loaders would, and the embeddings' GEMM state
is rebuilt by their own post-processing (for an untied `embed_tokens`, whose GEMM state only a tied `lm_head`
would use, on first use instead of on every sync).

`plan_direct_load` decides whether a model qualifies and says why not; the worker then uses vLLM's layerwise
reload. Conditions: CPU platform other than zentorch (whose unpacked path keeps a reference to the weight),
engine tensor and pipeline parallel size 1 (the loaders' TP slicing is not redone here), every linear layer
unquantized with its weight already packed away, and every checkpoint tensor naming a parameter of the model,
directly or through `packed_modules_mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

LINEAR_METHOD = "UnquantizedLinearMethod"
EMBEDDING_METHOD = "UnquantizedEmbeddingMethod"


@dataclass
class _Group:
    """One linear layer's weight, fused from `members` (HF names, in the module's row order)."""

    module: torch.nn.Module
    path: str
    members: list
    dtype: torch.dtype
    rows: int
    cols: int
    received: dict = field(default_factory=dict)  # HF name -> tensor, until the group is complete


@dataclass
class _Copy:
    """An HF tensor copied into (rows `start`.. of) an existing parameter."""

    module: torch.nn.Module
    param: str
    start: Optional[int] = None  # row offset in a fused parameter (a bias of qkv_proj), None = whole
    rows: int = 0


class DirectLoader:
    """The per-model load plan and the state of one update session (`begin` ... `load` ... `finish`)."""

    def __init__(self, model: torch.nn.Module, groups: dict, copies: dict, tied_lm_head: bool):
        self.model = model
        self.groups = groups  # HF name -> _Group (shared by the group's members)
        self._distinct = list({id(g): g for g in groups.values()}.values())  # each group once
        self.copies = copies  # HF name -> _Copy
        self.tied_lm_head = tied_lm_head
        self.repack: dict = {}  # id(module) -> module whose GEMM state must be rebuilt at finish
        self.in_place = 0  # linear layers of this session packed straight from the received buffer
        self.concatenated = 0  # ... packed from a concatenation (or cast) of the received tensors

    # ------------------------------------------------------------------ session

    def begin(self) -> None:
        self.repack.clear()
        for g in self._unique_groups():
            g.received.clear()
        self.in_place = self.concatenated = 0

    def load(self, named) -> int:
        """Loads (name, tensor) pairs; a linear layer is packed as soon as all of its tensors arrived."""
        for name, tensor in named:
            if name in self.copies:
                self._copy(name, self.copies[name], tensor)
            elif name in self.groups:
                group = self.groups[name]
                if name in group.received:
                    raise ValueError(f"weight update sends {name!r} twice in one session")
                group.received[name] = tensor
                if len(group.received) == len(group.members):
                    self._pack(group)
            elif not (self.tied_lm_head and name == "lm_head.weight"):  # vLLM skips it too for tied models
                raise KeyError(
                    f"direct weight load: {name!r} names no parameter of this engine's model; "
                    "set rollout.engine_direct_load=false to use vLLM's own reload"
                )
        return len(named)

    def detach(self, flat: torch.Tensor) -> int:
        """Copies the received tensors of incomplete layers that are views of `flat` (about to be reused)."""
        ptr = flat.untyped_storage().data_ptr()
        copied = 0
        for g in self._unique_groups():
            for name, t in list(g.received.items()):
                if t.device == flat.device and t.untyped_storage().data_ptr() == ptr:
                    g.received[name] = t.clone()
                    copied += 1
        return copied

    def finish(self) -> list:
        """Has the GEMM state of the input embeddings that received a tensor rebuilt on first use (`lm_head`'s was
        rebuilt when its tensor came; a tied `lm_head` is the worker's to refresh). Returns the linear layers that got
        some but not all of their tensors: they keep their old weights (a partial update must send a layer's
        tensors together, as with vLLM's own reload)."""
        for module in self.repack.values():
            _pack_on_first_use(module)
        self.repack.clear()
        incomplete = sorted({g.path for g in self._unique_groups() if g.received})
        for g in self._unique_groups():
            g.received.clear()
        return incomplete

    # ------------------------------------------------------------------ steps

    def _unique_groups(self):
        return self._distinct

    def _copy(self, name: str, target: _Copy, tensor: torch.Tensor) -> None:
        param = getattr(target.module, target.param)
        loader = getattr(param, "weight_loader", None)
        if target.start is None and loader is not None:
            loader(param, tensor)  # vLLM's own (e.g. an embedding's: copies the rows, zeroes the vocab padding)
        else:
            dest = param.data if target.start is None else param.data[target.start : target.start + target.rows]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"direct weight load: {name!r} has shape {tuple(tensor.shape)}, the engine's "
                    f"parameter takes {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
        if type(getattr(target.module, "quant_method", None)).__name__ == EMBEDDING_METHOD:
            if target.module is getattr(self.model, "lm_head", None):  # now, overlapping the next bucket's export
                target.module.quant_method.process_weights_after_loading(target.module)
            else:
                self.repack[id(target.module)] = target.module

    def _pack(self, group: _Group) -> None:
        parts = [group.received[m] for m in group.members]
        for m, t in zip(group.members, parts):
            if t.dim() != 2 or t.shape[1] != group.cols:
                raise ValueError(
                    f"direct weight load: {m!r} has shape {tuple(t.shape)}; {group.path} takes [rows, {group.cols}]"
                )
        if sum(t.shape[0] for t in parts) != group.rows:
            raise ValueError(
                f"direct weight load: {group.members} have {sum(t.shape[0] for t in parts)} rows "
                f"together; {group.path} takes {group.rows}"
            )
        fused = fused_view(parts)
        in_place = fused is not None and fused.dtype == group.dtype
        if not in_place:
            fused = torch.cat([t.to(group.dtype) for t in parts])
        module = group.module
        module.weight = torch.nn.Parameter(fused, requires_grad=False)
        module.quant_method.process_weights_after_loading(module)
        kept = module.weight
        if kept.numel() and kept.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr():
            raise RuntimeError(
                f"direct weight load: {group.path}'s post-processing kept the received tensor "
                "instead of packing it; set rollout.engine_direct_load=false"
            )
        group.received.clear()
        if in_place:
            self.in_place += 1
        else:
            self.concatenated += 1


def fused_view(parts: list) -> Optional[torch.Tensor]:
    """The row-wise concatenation of 2-D `parts` as a view of their storage when they lie back to back in it
    (same storage, dtype and columns, contiguous, each starting where the previous one ends); else None."""
    first = parts[0]
    cols = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in parts:
        if (
            t.dtype != first.dtype
            or t.dim() != 2
            or t.shape[1] != cols
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
            or t.data_ptr() != end
        ):
            return None
        end = t.data_ptr() + t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in parts)
    return first.as_strided((rows, cols), (cols, 1))


def _pack_on_first_use(module: torch.nn.Module) -> None:
    """Rebuilds the GEMM state of an embedding the first time it is used as a GEMM weight."""

    def first_call(x, weight, bias):
        module.quant_method.process_weights_after_loading(module)  # sets module.cpu_linear
        return module.cpu_linear(x, weight, bias)

    module.cpu_linear = first_call


def _has_tied_lm_head(model: torch.nn.Module) -> bool:
    """Whether the model's `lm_head` shares its weight with `model.embed_tokens`."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return (
        lm_head is not None
        and embed is not None
        and getattr(lm_head, "weight", None) is not None
        and lm_head.weight is getattr(embed, "weight", None)
    )


def _plan_fused_rows(modules: dict, fused_rows: dict, copies: dict) -> tuple[dict, dict, str]:
    """Plan the checkpoint tensors that fill a module's parameter by rows (`fused_rows`: (module path, param)
    -> [(index, name, shape)]): weights become `_Group`s, other parameters row-range `_Copy`s (added to
    `copies`). Returns (groups by checkpoint name, groups by module path, "") or ({}, {}, the reason)."""
    groups: dict = {}
    by_module: dict = {}
    for (path, param), rows in fused_rows.items():
        module = modules[path]
        rows.sort()
        if param == "weight":
            group = _Group(
                module,
                path,
                [n for _, n, _ in rows],
                module.weight.dtype,
                int(module.output_size_per_partition),
                int(module.input_size_per_partition),
            )
            total = sum(int(s[0]) for _, _, s in rows)
            if total != group.rows or any(len(s) != 2 or int(s[1]) != group.cols for _, _, s in rows):
                return {}, {}, f"{path}: checkpoint shapes {[tuple(s) for _, _, s in rows]} do not fill its weight"
            for _, n, _ in rows:
                groups[n] = group
            by_module[path] = group
        else:
            start = 0
            for _, n, s in rows:
                copies[n] = _Copy(module, param, start, int(s[0]))
                start += int(s[0])
            if start != getattr(module, param).shape[0]:
                return {}, {}, f"{path}.{param}: checkpoint shapes do not fill it"
    return groups, by_module, ""


def plan_direct_load(model: torch.nn.Module, checkpoint_shapes: dict) -> tuple[Optional[DirectLoader], str]:
    """(loader, "") when `model` qualifies for direct loads of `checkpoint_shapes` (HF name -> shape), else
    (None, the reason)."""
    # lazy: vLLM is imported only in the engine processes
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None, "not a CPU platform (vLLM's reload keeps GPU storage and CUDA graphs valid)"
    if current_platform.is_zen_cpu():
        return None, "zentorch GEMMs may keep a reference to the loaded weight"
    # lazy: vLLM is imported only in the engine processes
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import LinearBase

    if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
        return None, "engine tensor/pipeline parallel size above 1"
    packed = dict(getattr(model, "packed_modules_mapping", None) or {})
    member_of = {m: (fused, i) for fused, members in packed.items() for i, m in enumerate(members)}
    modules = dict(model.named_modules())
    tied = _has_tied_lm_head(model)

    copies: dict = {}
    fused_rows: dict = {}  # (fused module path, param) -> [(index, name, rows)]
    for name, shape in checkpoint_shapes.items():
        if tied and name == "lm_head.weight":
            continue
        path, _, param = name.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        if path in modules and isinstance(getattr(modules[path], param, None), torch.nn.Parameter):
            module, fused_path, index = modules[path], path, None
        elif leaf in member_of and f"{parent}.{member_of[leaf][0]}" in modules:
            fused_path = f"{parent}.{member_of[leaf][0]}"
            module, index = modules[fused_path], member_of[leaf][1]
        else:
            return None, f"checkpoint tensor {name!r} names no parameter of the model"
        method = type(getattr(module, "quant_method", None)).__name__
        is_linear = param == "weight" and isinstance(module, LinearBase)
        if is_linear:
            if method != LINEAR_METHOD or not hasattr(module, "cpu_linear") or module.weight.numel() != 0:
                return None, f"{fused_path} is not an unquantized linear layer with its weight packed ({method})"
            fused_rows.setdefault((fused_path, param), []).append((index or 0, name, shape))
        elif index is None:
            target = getattr(module, param)
            if getattr(target, "weight_loader", None) is None and tuple(target.shape) != tuple(shape):
                return None, f"{name!r} has shape {tuple(shape)}; the model's parameter {tuple(target.shape)}"
            copies[name] = _Copy(module, param)
        else:
            fused_rows.setdefault((fused_path, param), []).append((index, name, shape))

    groups, by_module, reason = _plan_fused_rows(modules, fused_rows, copies)
    if reason:
        return None, reason
    for path, module in modules.items():
        if isinstance(module, LinearBase) and path not in by_module:
            return None, f"linear layer {path} receives no checkpoint tensor"
    return DirectLoader(model, groups, copies, tied), ""

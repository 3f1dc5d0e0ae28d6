"""Small shared test helpers (paths to the repo and to the read-only shared/ folder)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUFFY_SHARED_DIR", REPO.parent / "shared"))
PYTHON = REPO / ".venv" / "bin" / "python"
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def without_ray_auth(env: dict[str, str]) -> dict[str, str]:
    """`env` without the test session's Ray token (tests/conftest.py): a luffy-train or tool run given it starts
    its local cluster as a user's run does, with token auth and a token of its own
    (`luffy_megatron.utils.ray_auth`)."""
    return {k: v for k, v in env.items() if k not in RAY_AUTH_VARS}


# ------------------------------------------------------------------------- weights into running engines


def flat_buckets(named_tensors, bucket_bytes: int):
    """(uint8 buffer, wire entries) per bucket of at most about `bucket_bytes` (a larger tensor forms its own), in
    the weight sync's flat-bucket format (`convert.export.FlatEntry`). Each tensor starts one `ALIGN` after the
    previous one ends, so no two are adjacent: as with tensors sent one by one, q/k/v or gate/up never form one
    fused view and a direct load concatenates them (a Megatron export lays them back to back instead)."""
    import torch

    from luffy_megatron.convert.export import ALIGN, FlatEntry

    def padded(n):
        return (n + ALIGN - 1) // ALIGN * ALIGN + ALIGN

    pending, held = [], 0
    for name, tensor in list(named_tensors) + [(None, None)]:
        size = 0 if tensor is None else padded(tensor.numel() * tensor.element_size())
        if pending and (tensor is None or held + size > bucket_bytes):
            flat = torch.zeros(held, dtype=torch.uint8)
            entries, offset = [], 0
            for n, t in pending:
                entry = FlatEntry(n, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset)
                entry.view(flat).copy_(t)
                entries.append(entry.to_wire())
                offset += padded(entry.nbytes)
            yield flat, entries
            pending, held = [], 0
        if tensor is not None:
            pending.append((name, tensor.detach().cpu()))
            held += size


def push_weights(
    engines, named_tensors, *, bucket_bytes: int = 64 * 1024**2, partial: bool = False, direct=None
) -> dict:
    """One weight-update session on every engine (`VLLMEngineActor` handles) through the engines' flat-bucket entry
    (`VLLMEngine.load_flat_bucket`, what the object-store transport calls): begin (`direct` as
    `VLLMEngine.begin_weight_update`), each bucket `ray.put` once and loaded by every engine, finish. On an error
    every session is closed (partial) and the error re-raised. Returns the first engine's `finish_weight_update`
    result with "buckets" (how many) added."""
    import ray

    ray.get([e.call.remote("begin_weight_update", direct=direct) for e in engines])
    buckets = 0
    try:
        for flat, entries in flat_buckets(named_tensors, bucket_bytes):
            ref = ray.put(flat.numpy())
            ray.get([e.call.remote("load_flat_bucket", ref, entries) for e in engines])
            buckets += 1
    except BaseException:
        ray.get([e.finish_weight_update.remote(partial=True) for e in engines])
        raise
    done = ray.get([e.finish_weight_update.remote(partial=partial) for e in engines])
    return {**done[0], "buckets": buckets}


# ------------------------------------------------------------------------- cluster


def tp_groups(layout) -> list[list[int]]:
    """The Megatron TP groups (rank lists) of a `cluster.layout.ClusterLayout`, from its ranks' coordinates."""
    groups: dict = {}
    for r in layout.ranks:
        groups.setdefault((r.cp_rank, r.dp_rank, r.pp_rank), []).append(r.rank)
    return sorted(groups.values())


def training_states(actors) -> list[dict]:
    """`training_state()` of every rank of an `ActorGroup`."""
    import ray

    return ray.get([w.training_state.remote() for w in actors.workers])

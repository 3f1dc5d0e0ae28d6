"""Training checkpoints: model, optimizer, LR schedule, RNG states, step and data position.

Layout under `<dir>`:
    step_000120/            one complete checkpoint (renamed into place only once fully written)
        model_optim/        megatron-core dist_checkpointing (torch_dist): model + optimizer state,
                            stored as global tensors, so it reloads under another TP/PP
        rng/rank_00003.pt   this rank's RNG states (python, numpy, torch, cuda)
        trainer_state.json  step, scheduler state, and whatever the trainer adds (data position, ...)
    step_000120.tmp-<pid>/  a checkpoint being written (or torn by a crash): never read
    latest                  the name of the newest complete checkpoint, replaced atomically, LAST

A crash at any point leaves `latest` naming a complete checkpoint (or absent). Retention keeps the
newest `keep` complete checkpoints after `latest` moves.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from luffy_megatron.compat.megatron import in_process_results_queue
from luffy_megatron.convert.checkpoint import load_sharded
from luffy_megatron.utils.fs import atomic_write_text, collective_atomic_dir, sweep_abandoned

log = logging.getLogger(__name__)

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _rng_state() -> dict:
    """This rank's RNG states as plain values and tensors only, so that loading them needs no unpickling of
    arbitrary objects (`torch.load(weights_only=True)`): numpy's key array travels as an int64 tensor."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older files: numpy's own array
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(rng_file: Path) -> bool:
    """Restore this rank's RNG states from `rng_file` without unpickling arbitrary objects (a checkpoint may
    come from a shared location: `--resume PATH`). Older files hold numpy arrays, which load where numpy's array
    types are allow-listed (megatron-core registers them on the ranks). A file that holds anything else is not
    loaded: a warning names it and the run goes on with the current RNG state.
    Returns whether it restored."""
    try:
        state = torch.load(rng_file, weights_only=True)
        _set_rng_state(state)
    except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError) as err:
        log.warning(
            "RNG state not restored from %s (not a plain-tensor RNG file: %s)",
            rng_file,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        return False
    return True


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").exists()]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by `latest`; None if there is none. A `latest` naming a missing directory
    (deleted by hand) falls back to the newest complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if (target / "trainer_state.json").exists():
            return target
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def _model_optim_state(actor, *, is_loading: bool) -> dict:
    """One sub-dict per model chunk (virtual pipeline chunks use local layer numbers in their keys, so a
    flat merge of their state dicts would overwrite one chunk's layers with another's), as Megatron-LM's
    checkpointing nests them; the optimizer maps its state onto all of their sharded tensors."""
    model_sd = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(actor.model)}
    return {**model_sd, "optimizer": actor.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def save_checkpoint(
    actor, root: str | os.PathLike, *, step: int, trainer_state: dict[str, Any] | None = None, keep: int = 3
) -> Path:
    """Collective over all ranks of the actor. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing  # lazy: the driver imports this module, never megatron

    root = Path(root)
    final = root / step_dir_name(step)
    if dist.get_rank() == 0:
        sweep_abandoned(root)  # earlier saves cut short (a killed job): a full checkpoint each
    with collective_atomic_dir(final, subdirs=("model_optim", "rng")) as tmp:
        with in_process_results_queue():
            dist_checkpointing.save(_model_optim_state(actor, is_loading=False), str(tmp / "model_optim"))
        torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank():05d}.pt")
        if dist.get_rank() == 0:
            state = {
                "step": step,
                "actor_step": actor.step,
                "scheduler": actor.scheduler.state_dict(),
                "world_size": dist.get_world_size(),
                **(trainer_state or {}),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    # the checkpoint is complete from here on
    if dist.get_rank() == 0:
        atomic_write_text(root / LATEST, final.name)  # and only now does anyone resume from it
        prune(root, keep=keep)
    dist.barrier()
    return final


def prune(root: str | os.PathLike, *, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names).
    `keep <= 0` keeps everything. Returns what was deleted."""
    if keep <= 0:
        return []
    latest = find_latest(root)
    doomed = [p for p in complete_checkpoints(root)[:-keep] if p != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_checkpoint(actor, ckpt: str | os.PathLike) -> dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler, RNG (this rank's, when the world size is the
    same) and the actor's step; returns the trainer state saved with it."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    loaded = load_sharded(_model_optim_state(actor, is_loading=True), ckpt / "model_optim")
    for i, chunk in enumerate(actor.model):
        chunk.load_state_dict(loaded[f"model{i}"], strict=False)
    actor.optimizer.load_state_dict(loaded["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    actor.step = state["actor_step"]
    rng_file = ckpt / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if state.get("world_size") == dist.get_world_size() and rng_file.exists():
        load_rng_state(rng_file)
    return state

"""Where a run stands, and the checkpoint policy that follows from it: resume, periodic saves, the save on a
stop signal, and what a failure leaves to resume from."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray  # the driver calls the ranks through Ray

from luffy_megatron.actor.checkpoint import LATEST, complete_checkpoints, find_latest
from luffy_megatron.actor.remote import load_checkpoint, save_checkpoint
from luffy_megatron.cluster.supervision import GuardedRanks, RankFailure, RunError, remote_cause
from luffy_megatron.config import Config, ConfigError
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.rollout.faults import EngineFailure, EngineSupervisor
from luffy_megatron.utils.fs import sweep_abandoned
from luffy_megatron.utils.preemption import Preempted, StopSignals

log = logging.getLogger("luffy.trainer")


@dataclass
class RunProgress:
    """The actor's newest state (after `step`, with the sampler at `data_position`) and the newest step that is
    checkpointed. The loop reports each update (`trained`); the policy methods decide what to save."""

    cfg: Config
    ranks: GuardedRanks
    out: Path
    sampler: PromptSampler
    kl_ctrl: object = None  # algo.kl controller: its beta is saved with the step
    data: dict | None = None  # the training data's `data_fingerprint`, saved with the step
    step: int = 0
    data_position: int = 0
    saved_step: int = 0

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @classmethod
    def resume(
        cls,
        cfg: Config,
        ranks: GuardedRanks,
        engines: EngineSupervisor,
        sampler: PromptSampler,
        out: Path,
        *,
        kl_ctrl=None,
        workers=None,
    ) -> RunProgress:
        """Continue from trainer.resume_from (`luffy-train --resume PATH`), else from the newest complete
        checkpoint (trainer.resume=auto); the step reached is also the actor's weight version. The checkpoint's
        training data must be the run's (`check_data`). The engines get the actor's weights first unless they
        are known to hold them (`EngineFleet.synced_version`: fresh workers, or the last run on these workers
        ended synced). `workers` (`cluster.Workers`): a checkpoint is loaded with colocated engines asleep
        (`Workers.engines_asleep`), and they wake their KV cache only after the sync."""
        data = data_fingerprint(cfg.data.train_files, sampler.size)
        latest, state = None, None
        if cfg.trainer.resume_from:
            latest = resume_path(cfg.trainer.resume_from)
            check_data(latest, data, allow_change=cfg.trainer.allow_data_change)  # before the long load
            with engines_asleep(workers):
                state = ranks.run(load_checkpoint, latest)
        elif cfg.trainer.resume == "auto":
            sweep_abandoned(out / "checkpoints")  # saves a killed job cut short: a full checkpoint each, named
            if find_latest(out / "checkpoints") or complete_checkpoints(out / "checkpoints"):
                with engines_asleep(workers):
                    latest, state = load_newest(
                        ranks, out / "checkpoints", data, allow_change=cfg.trainer.allow_data_change
                    )
        step = 0 if latest is None else int(state["step"])
        if cfg.trainer.resume_from or cfg.trainer.resume != "auto":  # a roll-back, or a new run over an old one
            set_aside_newer(out / "checkpoints", step)
        if latest is not None:
            sampler.position = state.get("data_position", 0)
            if kl_ctrl is not None and "kl_ctrl" in state:  # the adaptive beta continues (algo/kl.py)
                kl_ctrl.load_state_dict(state["kl_ctrl"])
        if latest is not None or engines.fleet.synced_version != step:
            if workers is not None:
                workers.rollout_phase()  # colocated: the ranks give back their cache, the weights wake for the sync
            engines.sync(version=step)
            if workers is not None:
                workers.generation_phase()
        engines.version = step
        if latest is not None:
            log.warning("resumed from %s (step %d)", latest, step)
        return cls(cfg, ranks, out, sampler, kl_ctrl, data, step=step, data_position=sampler.position, saved_step=step)

    def trained(self, step: int, position: int | None = None) -> None:
        """The update of `step` has changed the actor (what a failure afterwards must checkpoint). `position`:
        the data position after the step's prompts (default the sampler's; it is ahead of the trained batch
        while the next one is generated during the step, trainer.overlap=one_step)."""
        self.step, self.data_position = step, self.sampler.position if position is None else position

    def save(self) -> int:
        """Checkpoint the state after the newest step (model, optimizer, RNG, data position and the data's
        fingerprint, the KL controller's beta); returns that step."""
        state = {"data_position": self.data_position}
        if self.data is not None:
            state["data_fingerprint"] = self.data
        if self.kl_ctrl is not None:
            state["kl_ctrl"] = self.kl_ctrl.state_dict()
        try:
            self.ranks.run(
                save_checkpoint, self.checkpoints, self.step, state, self.cfg.trainer.max_checkpoints_to_keep
            )
        except ray.exceptions.RayTaskError as err:
            cause = remote_cause(err)
            if not isinstance(cause, OSError) and not out_of_space(self.checkpoints):
                raise
            raise checkpoint_error(self.checkpoints, self.step, cause) from None
        self.saved_step = self.step
        return self.step

    def save_due(self, total_steps: int) -> bool:
        freq = self.cfg.trainer.save_freq
        return freq > 0 and (self.step % freq == 0 or self.step == total_steps)

    def stop(self, signals: StopSignals) -> Preempted:
        """A stop signal arrived: make sure the state after the newest step is checkpointed (unless it is saved
        already) and describe the stop for `main` (utils/preemption.py)."""
        if self.saved_step != self.step:
            self.save()
        latest = find_latest(self.checkpoints)
        return Preempted(
            signals.signal_name, self.step, str(latest) if latest else "none (stopped before the first step)"
        )

    def after_failure(self, failure: RunError) -> RunError:
        """A step failed while the actor is healthy (an engine, stale or drifting rollouts): checkpoint the
        actor's newest state unless it is saved already, and add to the error where the run can resume from.
        A rank died (`RankFailure`): nothing can be saved now; the newest complete checkpoint is untouched (a
        checkpoint is renamed into place only once complete). Returns the error to raise."""
        if isinstance(failure, RankFailure):
            latest = find_latest(self.checkpoints)
            resume_from = (
                f"the newest complete checkpoint is {latest}: run the same command again to resume from it"
                if latest
                else "there is no checkpoint yet"
            )
            failure.args = (f"{failure}. The run stops; {resume_from}",)
            return failure
        if self.step == 0:
            note = "nothing was trained yet, so there is no checkpoint to resume from"
        elif self.step == self.saved_step:
            note = (
                f"the actor's state after step {self.step} is in checkpoint {find_latest(self.checkpoints)}; "
                "run the same command again to resume from it"
            )
        else:
            note = self._save_after_failure()
        if isinstance(failure, EngineFailure) and self.cfg.rollout.on_engine_failure == "fail":
            note += " (rollout.on_engine_failure=restart restarts a failed engine instead)"
        failure.args = (f"{failure}\n{note}",)
        return failure

    def _save_after_failure(self) -> str:
        try:
            self.save()
            return (
                f"wrote a checkpoint of the actor after step {self.step}: {find_latest(self.checkpoints)}; "
                "run the same command again to resume from it"
            )
        except Exception as err:  # noqa: BLE001 - the save after a failure is best effort; the note says what happened
            latest = find_latest(self.checkpoints)
            return (
                f"writing a checkpoint after the failure failed too ({type(err).__name__}: {err}); the newest "
                f"complete checkpoint is {latest or 'none'}"
            )


class CheckpointError(RunError):
    """A checkpoint could not be written (disk full, permissions): `luffy-train` reports it in one line."""


def out_of_space(root: Path) -> bool:
    """After a failed save: is there less free space under `root` than the newest complete checkpoint takes (what
    the next one needs)? A disk that fills during megatron-core's checkpoint write does not always surface as
    an OSError: its writer processes report "Worker failure: ... unexpected pos" (torch's zip writer after a
    short write) inside a CheckpointException. The torn write is already removed, so its space is free again."""
    latest = find_latest(root)
    if latest is None:
        return False
    try:
        needed = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
        return shutil.disk_usage(root).free < needed
    except OSError:
        return False


def checkpoint_error(root: Path, step: int, cause: BaseException) -> CheckpointError:
    """The failed save of `step` under `root`, with the free space there and what the run can resume from (a
    checkpoint takes its name only once complete, so the newest complete one is untouched). `cause`: the
    OSError, or what the writer raised when `out_of_space` says the disk is full."""
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.1f} GiB free there"
    except OSError:
        free = "free space unknown"
    latest = find_latest(root)
    resume_from = f"the newest complete checkpoint is {latest}" if latest else "there is no complete checkpoint yet"
    if isinstance(cause, OSError):
        what, filename = cause.strerror or str(cause), cause.filename
    else:
        first = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        what, filename = f"{type(cause).__name__}: {first}", None
        free += ", less than the newest checkpoint takes: the disk is full"
    where = f" ({filename})" if filename else ""
    return CheckpointError(
        f"writing the checkpoint of step {step} under {root} failed: {what}{where}; {free}. The run stops; "
        f"{resume_from}: free space (or fix the permissions) and run the same command again to resume from it"
    )


def set_aside_newer(root: Path, step: int) -> Path | None:
    """A run that starts at `step` (an older checkpoint with --resume, or a fresh start with
    trainer.resume=disable) over an output directory holding later steps: those steps (complete or not) and
    `latest` move into `superseded-<time>/` beside them, never deleted, so they neither outrank the new run's
    checkpoints (`find_latest`, pruning and the resume fallback go by step) nor get overwritten. Returns the
    directory they moved to (None when nothing was newer)."""
    newer = [p for p in sorted(root.glob("step_*")) if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) > step]
    if not newer:
        return None
    aside = root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in newer + ([root / LATEST] if (root / LATEST).exists() else []):
        p.rename(aside / p.name)
    log.warning(
        "this run starts at step %d: the later checkpoints %s under %s moved to %s (kept, not loaded)",
        step,
        ", ".join(p.name for p in newer),
        root,
        aside,
    )
    return aside


def engines_asleep(workers):
    """`Workers.engines_asleep()`, or nothing when the caller has no `cluster.Workers` (tests of the policy)."""
    return workers.engines_asleep() if workers is not None else contextlib.nullcontext()


def load_newest(ranks: GuardedRanks, root: Path, data: dict, *, allow_change: bool) -> tuple[Path | None, dict | None]:
    """Load the newest complete checkpoint under `root` on the ranks; one that cannot be read (a torn
    trainer_state.json, an unreadable shard) is skipped with a warning naming it and what was wrong, and the
    previous one is tried. Returns (checkpoint, its trainer state), or (None, None) when there is none."""
    latest = find_latest(root)
    older = [c for c in reversed(complete_checkpoints(root)) if c != latest]
    for checkpoint in ([latest] if latest else []) + older:
        try:
            check_data(checkpoint, data, allow_change=allow_change)  # before the long load
            return checkpoint, ranks.run(load_checkpoint, checkpoint)
        except (ray.exceptions.RayTaskError, json.JSONDecodeError, OSError, KeyError) as err:
            cause = remote_cause(err)
            log.warning(
                "checkpoint %s cannot be loaded (%s: %s): trying the previous one",
                checkpoint,
                type(cause).__name__,
                str(cause).splitlines()[0] if str(cause) else "",
            )
    if latest is not None:
        raise RunError(f"no checkpoint under {root} could be loaded (see the warnings above for each)")
    return None, None


def resume_path(path: str) -> Path:
    """The checkpoint that trainer.resume_from names: a checkpoint directory (step_N, with trainer_state.json)
    or a checkpoints directory (its newest complete checkpoint). Anything else is a ConfigError."""
    given = Path(path)
    if (given / "trainer_state.json").is_file():
        return given
    found = find_latest(given) if given.is_dir() else None
    if found is None:
        what = "does not exist" if not given.exists() else "holds no complete checkpoint (no trainer_state.json)"
        raise ConfigError(
            f"trainer.resume_from={path} {what}; give a checkpoint directory such as "
            "<output_dir>/checkpoints/step_000050 or the checkpoints directory"
        )
    return found


def data_fingerprint(train_files: list[str], rows: int) -> dict:
    """What identifies a run's training data: each of data.train_files' file name and size (not its directory:
    a copy elsewhere is the same data) and the number of usable rows after tokenization, with a short sha256
    over them (`sha256`) to compare."""
    files = [{"name": Path(f).name, "bytes": os.path.getsize(f)} for f in train_files]
    digest = hashlib.sha256(json.dumps({"files": files, "rows": rows}, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest[:16], "files": files, "rows": rows}


def describe_data(fingerprint: dict) -> str:
    files = ", ".join(f"{f['name']} ({f['bytes']} bytes)" for f in fingerprint["files"])
    return f"{files}: {fingerprint['rows']} rows"


def check_data(checkpoint: Path, data: dict, *, allow_change: bool) -> None:
    """The training data of the run that wrote `checkpoint` (its trainer_state.json) against this run's
    (`data_fingerprint`). Different data would continue at the saved data position in another order of prompts:
    a ConfigError naming both, unless trainer.allow_data_change (then a warning). A checkpoint written before
    fingerprints were saved resumes with a warning."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("data_fingerprint")
    if saved is None:
        log.warning("checkpoint %s does not record its training data (an older checkpoint): not checked", checkpoint)
        return
    if saved.get("sha256") == data["sha256"]:
        return
    change = (
        f"the training data (data.train_files, and their usable rows after tokenization) differ from those of "
        f"checkpoint {checkpoint}: it was trained on {describe_data(saved)}; this run has {describe_data(data)}"
    )
    if not allow_change:
        raise ConfigError(
            f"{change}. Resuming would continue at its data position in another order of prompts; give the same "
            "data (files and data settings), or set trainer.allow_data_change=true to continue anyway"
        )
    log.warning("%s; continuing anyway (trainer.allow_data_change=true)", change)

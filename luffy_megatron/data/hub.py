"""LUFFY's inputs from the Hugging Face Hub or a local copy: the training set and the model, each checked.

* `prepare_openr1`: upstream's training set ``Elliott/Openr1-Math-46k-8192`` (a Hub id read with ``datasets``,
  a folder from ``hf download`` or ``Dataset.save_to_disk``, or one parquet file). Every row is checked as the
  trainer's reader checks it (`luffy_row_problem`); the rows are written unchanged, every column kept, to
  ``<out>/openr1.parquet`` through a temporary name and a rename. Malformed rows: nothing is written and the
  error lists the first few (row index, field), unless ``skip_bad_rows`` drops them (counted in the summary).
  The validation set (upstream's ``data/valid.parquet``) is checked the same way and copied to
  ``<out>/valid.parquet``.
* `fetch_model` + `check_model`: a model folder downloaded with ``huggingface_hub.snapshot_download``
  (an interrupted download run again keeps the files already complete and fetches the rest; a file cut midway
  starts over) or given as a local folder, then checked: weights present, ``max_position_embeddings`` covering
  prompt + response, and a chat template whose generation prompt ends with ``"<think>\\n"`` (otherwise the
  trainer and ``luffy-eval`` use `DEFAULT_CHAT_TEMPLATE`).

A source that is neither on this machine nor reachable on the Hub raises `Unavailable`, whose message is one
line saying what to download and where to put it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import huggingface_hub
from huggingface_hub import errors as hub_errors
from tqdm.auto import tqdm

from luffy_megatron.data.errors import BadRowReport, DataError
from luffy_megatron.data.readers import datasets_progress_bars_off, luffy_row_problem, read_luffy_parquet, shared_dir
from luffy_megatron.data.tokenization import THINK_PREFIX, resolve_chat_template
from luffy_megatron.data.writers import write_dataset_parquet
from luffy_megatron.utils.fs import fsync_dir

OPENR1_ID = "Elliott/Openr1-Math-46k-8192"
MODEL_ID = "Elliott/Qwen2.5-Math-7B-16k-think"
VALID_URL = "https://github.com/ElliottYan/LUFFY/tree/main/data"
RECIPE_CONTEXT = 1024 + 8192  # the main recipe's data.max_prompt_length + data.max_response_length
MAX_LISTED_BAD_ROWS = 5
_DEFAULT_GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"  # what DEFAULT_CHAT_TEMPLATE ends a prompt with

Say = Callable[[str], None]  # where progress lines go (the CLI prints them on stdout)


class Unavailable(Exception):
    """The source is not on this machine and the Hub cannot give it; the message is one line."""


def default_valid_path() -> Path | None:
    """Upstream's ``valid.parquet`` in the shared data folder, when this machine has it."""
    path = shared_dir() / "data" / "eval" / "luffy" / "valid.parquet"
    return path if path.is_file() else None


def _looks_local(source: str) -> bool:
    """A source that names a file or folder rather than a Hub id (``owner/name``)."""
    return source.startswith((".", "/", "~")) or source.endswith(".parquet") or source.count("/") != 1


# ------------------------------------------------------------------------------------------- the data set


@contextlib.contextmanager
def _hub_retries_quiet() -> Iterator[None]:
    # Without a network, huggingface_hub logs one line per retry before datasets gives up; the caller
    # turns the final error into one line of its own.
    before = huggingface_hub.utils.logging.get_verbosity()
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        huggingface_hub.utils.logging.set_verbosity(before)


def _offline_dataset_message(source: str, reason: str) -> str:
    return (
        f"cannot load {source} from the Hugging Face Hub ({reason}); on a machine with internet run "
        f"`hf download {source} --repo-type dataset --local-dir openr1-hf`, copy the openr1-hf folder here "
        f"and pass --source openr1-hf"
    )


def _train_split(loaded: Any, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{source}: no 'train' split (splits: {sorted(loaded)})")
        return loaded["train"]
    return loaded


def load_openr1_source(source: str) -> datasets.Dataset:
    """The training rows of ``source``: a parquet file, a ``save_to_disk`` folder, a folder of data files
    (``hf download``), or a Hub id read with ``datasets.load_dataset(source, split="train")``."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{path}: expected a .parquet file, a folder or a Hugging Face data set id")
        with datasets_progress_bars_off():
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _train_split(datasets.load_from_disk(str(path)), source)
        return datasets.load_dataset(str(path), split="train")
    if _looks_local(source):
        raise Unavailable(
            f"{source}: no such file or folder (expected a parquet file, a folder or a Hub id such as {OPENR1_ID})"
        )
    try:
        with _hub_retries_quiet():
            return datasets.load_dataset(source, split="train")
    except (ConnectionError, hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError) as exc:
        reason = "HF_HUB_OFFLINE=1" if huggingface_hub.constants.HF_HUB_OFFLINE else "no connection"
        raise Unavailable(_offline_dataset_message(source, reason)) from exc
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError: an unknown or private id
        raise Unavailable(
            f"{source}: no such data set on the Hugging Face Hub (nor a local file or folder); "
            f"LUFFY's training set is {OPENR1_ID}"
        ) from exc


def check_rows(
    dataset: datasets.Dataset, source: str, *, require_target: bool, say: Say, batch_size: int = 2000
) -> tuple[BadRowReport, list[int], int]:
    """Every row checked as the trainer's reader checks it; returns the bad-row report, the indices of the
    malformed rows and the number of demonstrations that do not start with ``"<think>\\n"`` (upstream's all
    do; the trainer accepts them)."""
    report = BadRowReport(path=source, num_rows_read=len(dataset), max_examples=MAX_LISTED_BAD_ROWS)
    bad: list[int] = []
    no_think = 0
    bar = tqdm(total=len(dataset), desc="checking rows", unit="row")
    for start in range(0, len(dataset), batch_size):
        columns = dataset[start : start + batch_size]
        names = list(columns)
        for offset, values in enumerate(zip(*(columns[n] for n in names))):
            row = dict(zip(names, values))
            problem = luffy_row_problem(row, require_target=require_target)
            if problem is not None:
                report.add(start + offset, *problem)
                bad.append(start + offset)
            elif row.get("target") and not row["target"][0]["content"].startswith(THINK_PREFIX):
                no_think += 1
        bar.update(len(columns[names[0]]) if names else 0)
    bar.close()
    say(f"checked {len(dataset)} rows of {source}: {report.num_bad_rows} malformed")
    return report, bad, no_think


def refuse_bad_rows(report: BadRowReport, what: str) -> DataError:
    """The error for malformed rows when they are not skipped: the count and the first few rows."""
    rows = "\n  ".join(report.examples)
    return DataError(
        f"{report.num_bad_rows} of {report.num_rows_read} rows of {what} are malformed; nothing was written "
        f"(--skip-bad-rows writes the others). First {len(report.examples)}:\n  {rows}"
    )


def copy_valid(src: Path, out_dir: Path, say: Say) -> tuple[Path, int]:
    """Check ``src`` as the trainer reads validation files, then copy it (bytes unchanged) to
    ``<out_dir>/valid.parquet`` atomically. Returns (path, rows)."""
    examples, _ = read_luffy_parquet(src, require_target=False)
    final = out_dir / "valid.parquet"
    if src.resolve() != final.resolve():
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(out_dir)
        finally:
            tmp.unlink(missing_ok=True)
    say(f"wrote {final} ({len(examples)} validation rows from {src})")
    return final, len(examples)


def resolve_valid(valid: str | None) -> Path:
    """The validation file to copy: ``valid``, else the shared copy of upstream's when there is one."""
    if valid is not None:
        path = Path(valid).expanduser()
        if not path.is_file():
            raise Unavailable(f"--valid {valid}: no such file; upstream's valid.parquet is at {VALID_URL}")
        return path
    path = default_valid_path()
    if path is None:
        raise Unavailable(f"--valid PATH is required: download valid.parquet from {VALID_URL} and pass its path")
    return path


def prepare_openr1(
    source: str, out_dir: str | Path, *, valid: str | None = None, skip_bad_rows: bool = False, say: Say = print
) -> dict[str, Any]:
    """Load, check and write ``<out_dir>/openr1.parquet`` and ``<out_dir>/valid.parquet``; returns a summary."""
    out_dir = Path(out_dir)
    valid_src = resolve_valid(valid)  # before the long part: a missing file fails at once
    say(f"loading {source}")
    dataset = load_openr1_source(source)
    if len(dataset) == 0:
        raise DataError(f"{source}: contains no rows")
    report, bad, no_think = check_rows(dataset, source, require_target=True, say=say)
    if report.num_bad_rows and not skip_bad_rows:
        raise refuse_bad_rows(report, source)
    if report.num_bad_rows == len(dataset):
        raise DataError(f"all {len(dataset)} rows of {source} are malformed; first: {report.examples[0]}")
    if report.num_bad_rows:
        skipped = set(bad)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in skipped])
        report.log()
    if no_think:
        say(f"note: {no_think} demonstrations do not start with <think>\\n (upstream's all do)")
    train_path = write_dataset_parquet(dataset, out_dir / "openr1.parquet")
    say(f"wrote {train_path} ({len(dataset)} rows, columns: {', '.join(dataset.column_names)})")
    valid_path, valid_rows = copy_valid(valid_src, out_dir, say)
    return {
        "train": str(train_path),
        "rows_written": len(dataset),
        "rows_rejected": report.num_bad_rows,
        "rejected_reasons": dict(report.reasons),
        "demos_without_think_prefix": no_think,
        "valid": str(valid_path),
        "valid_rows": valid_rows,
        "source": source,
    }


# ------------------------------------------------------------------------------------------------ the model


def fetch_model(source: str, out: str | Path | None, *, revision: str | None = None, say: Say = print) -> Path:
    """The model folder: ``source`` itself when it is a folder here, else ``snapshot_download`` of the Hub id
    into ``out`` (a rerun keeps the files already complete; offline, an existing ``out`` is used as it is)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if out is not None and Path(out).resolve() != path.resolve():
            say(f"note: {source} is a local folder: it is checked where it is, --out {out} is not used")
        return path
    if _looks_local(source):
        raise Unavailable(f"{source}: no such folder (expected a model folder or a Hub id such as {MODEL_ID})")
    if out is None:
        raise DataError(f"--out is required to download {source} (e.g. --out models/{source.split('/')[1]})")
    say(
        f"downloading {source} into {out} (huggingface_hub.snapshot_download; a rerun keeps the files already complete)"
    )
    try:
        return Path(huggingface_hub.snapshot_download(source, local_dir=str(out), revision=revision))
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError) as exc:
        raise Unavailable(
            f"{source}: not found on the Hugging Face Hub, or not accessible "
            f"({type(exc).__name__}); LUFFY's model is {MODEL_ID}"
        ) from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError) as exc:
        reason = "HF_HUB_OFFLINE=1" if huggingface_hub.constants.HF_HUB_OFFLINE else "no connection"
        raise Unavailable(
            f"cannot download {source} ({reason}); on a machine with internet run "
            f"`hf download {source} --local-dir {out}`, copy that folder to {out} here and run this again"
        ) from exc


@dataclass
class ModelReport:
    """What `check_model` found. ``problems``: the model cannot run the recipe as it is; ``warnings``: it can,
    with what the message says the trainer does instead."""

    path: str
    max_position_embeddings: int | None = None
    need_context: int = RECIPE_CONTEXT
    context_ok: bool = False
    chat_template: str = ""  # "model" (its own ends with <think>\n) or "default" (the trainer's fallback)
    prompt_ends_with: str = ""  # what follows the user's message in a prompt under the model's own template
    weight_files: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _weight_files(path: Path, report: ModelReport) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            report.weight_files = len(shards) - len(missing)
            if missing:
                report.problems.append(
                    f"{len(missing)} of {len(shards)} weight files listed in {index_name} are "
                    f"missing (first: {missing[0]}): an interrupted download? run it again"
                )
            return
    report.weight_files = len(list(path.glob("*.safetensors"))) + len(list(path.glob("pytorch_model*.bin")))
    if not report.weight_files:
        report.problems.append(f"{path}: no weights (*.safetensors): an interrupted download? run it again")


def _context(path: Path, report: ModelReport) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        report.problems.append(f"{config_file}: missing")
        return
    config = json.loads(config_file.read_text())
    length = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    if not isinstance(length, int):
        report.problems.append(f"{config_file}: no max_position_embeddings")
        return
    report.max_position_embeddings = length
    report.context_ok = length >= report.need_context
    if not report.context_ok:
        report.problems.append(
            f"max_position_embeddings={length} < {report.need_context} (prompt + response of the recipe): "
            f"the rollout engines need that many positions (a longer-context model, or a lower --need-context "
            f"with a matching data.max_response_length)"
        )


def _template(path: Path, report: ModelReport) -> None:
    from transformers import AutoTokenizer  # lazy: only the model check loads transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 -- any failure to load means the folder has no usable tokenizer
        report.problems.append(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})")
        return
    resolved = resolve_chat_template(tokenizer)
    report.chat_template = resolved.source
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        with contextlib.suppress(Exception):
            probe = tokenizer.apply_chat_template(
                [{"role": "user", "content": "1+1=?"}], chat_template=own, add_generation_prompt=True, tokenize=False
            )
            report.prompt_ends_with = probe.rsplit("1+1=?", 1)[-1]  # what follows the user's message
    if resolved.source == "model":
        return
    what = f"ends it with {report.prompt_ends_with!r}" if report.prompt_ends_with else "is missing or fails"
    report.warnings.append(
        f"the model's chat template does not end the generation prompt with <think>\\n (it {what}); the trainer "
        f"and luffy-eval use their default ChatML template instead (generation prompt "
        f"{_DEFAULT_GENERATION_PROMPT!r}; data.chat_template unset); set data.chat_template to a .jinja file "
        f"to choose another"
    )


def check_model(path: str | Path, *, need_context: int = RECIPE_CONTEXT) -> ModelReport:
    """Check a model folder for the recipe: weights, context length, chat template (see the module doc)."""
    path = Path(path)
    report = ModelReport(path=str(path), need_context=need_context)
    _context(path, report)
    _weight_files(path, report)
    _template(path, report)
    return report

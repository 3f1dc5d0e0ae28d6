"""Writing LUFFY-format parquet atomically (temporary name, then rename: a crash never leaves a torn file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from luffy_megatron.data.errors import DataError
from luffy_megatron.data.readers import datasets_progress_bars_off
from luffy_megatron.utils.fs import fsync_dir


def write_luffy_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` (LUFFY columns: data_source, prompt, [target], ability, reward_model, extra_info) to
    ``path`` through a temporary file in the same folder and ``os.replace``. Returns the path."""
    if not rows:
        raise DataError(f"{path}: refusing to write a parquet file with no rows")

    return write_dataset_parquet(datasets.Dataset.from_list(rows), Path(path))


def write_dataset_parquet(dataset: datasets.Dataset, path: Path) -> Path:
    """``dataset`` (every column as it is) to ``path`` through ``.<name>.tmp-<pid>`` in the same folder,
    fsync and a rename: an interrupted write leaves the previous file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with datasets_progress_bars_off():
            dataset.to_parquet(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if pq.read_metadata(tmp).num_rows != len(dataset):
            raise DataError(f"{tmp}: wrote {len(dataset)} rows but the file's footer says otherwise")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path

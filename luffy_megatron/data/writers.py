"""Writing LUFFY-format parquet atomically (temporary name, then rename: a crash never leaves a torn file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from luffy_megatron.data.errors import DataError
from luffy_megatron.data.readers import datasets_progress_bars_off


def write_luffy_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` (LUFFY columns: data_source, prompt, [target], ability, reward_model, extra_info) to
    ``path`` through a temporary file in the same folder and ``os.replace``. Returns the path."""
    if not rows:
        raise DataError(f"{path}: refusing to write a parquet file with no rows")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with datasets_progress_bars_off():
            datasets.Dataset.from_list(rows).to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

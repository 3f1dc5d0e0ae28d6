"""Errors and bad-row bookkeeping shared by the readers and the tokenizer.

Rule of the data package: nothing is silently lost. A malformed row either raises a `DataError` naming the
file, the row index and the field, or -- when the user opted in with ``skip_bad_rows=True`` -- is counted
per reason in a `BadRowReport` that is returned to the caller and logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or a row in it cannot be used; the message names the file (and row and field)."""


@dataclass
class BadRowReport:
    """Rows skipped because they were malformed (only with ``skip_bad_rows=True``).

    ``reasons`` counts rows per reason (``"reward_model.ground_truth: empty string"``); ``examples`` keeps the
    full message of the first few skipped rows so a user can go and look at them.
    """

    path: str = ""
    num_rows_read: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def num_bad_rows(self) -> int:
        return sum(self.reasons.values())

    def add(self, row_index: int, field_name: str, problem: str) -> None:
        self.reasons[f"{field_name}: {problem}"] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(row_error_message(self.path, row_index, field_name, problem))

    def summary(self) -> str:
        if not self.num_bad_rows:
            return f"{self.path}: {self.num_rows_read} rows read, no bad rows"
        reasons = "; ".join(f"{n} x {r}" for r, n in self.reasons.most_common())
        return f"{self.path}: skipped {self.num_bad_rows} of {self.num_rows_read} rows as malformed ({reasons})"

    def log(self) -> None:
        if self.num_bad_rows:
            logger.warning("%s; first: %s", self.summary(), " | ".join(self.examples))
        else:
            logger.info("%s", self.summary())


def row_error_message(path: str | Path, row_index: int, field_name: str, problem: str) -> str:
    return f"{path}: row {row_index}: field '{field_name}': {problem}"

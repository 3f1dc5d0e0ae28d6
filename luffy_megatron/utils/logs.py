"""Console logging of the command-line programs (luffy-train, luffy-eval).

Handlers write to the stderr of the moment a record is emitted, not the one of the call that installed them
(logging.StreamHandler(sys.stderr) keeps the first: when a program's main() runs more than once in a process,
as in tests or notebooks, a replaced and closed stderr), and a program's logging setup is undone when its
main() returns, so one run does not change the next one's log level or format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


class CurrentStderrHandler(logging.StreamHandler):
    """StreamHandler on whatever sys.stderr is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def console_logging(logger_name: str, *, fmt: str, level: int, propagate: bool = True) -> Iterator[None]:
    """Log records of `logger_name` at `level` and above to stderr in `fmt` for the duration of the block."""
    target = logging.getLogger(logger_name or None)
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    saved = (target.level, target.propagate)
    target.addHandler(handler)
    target.setLevel(level)
    target.propagate = propagate
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(saved[0])
        target.propagate = saved[1]

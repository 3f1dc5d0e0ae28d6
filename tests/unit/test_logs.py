"""The programs' console logging writes to the current stderr and is undone when main() returns."""

import io
import logging
import sys

from luffy_megatron.utils.logs import console_logging


def test_records_go_to_the_stderr_of_the_moment_and_setup_is_undone(monkeypatch):
    log = logging.getLogger("luffy_megatron.test_logs")
    package = logging.getLogger("luffy_megatron")
    before = (package.level, package.propagate, list(package.handlers))
    first, second = io.StringIO(), io.StringIO()
    with console_logging("luffy_megatron", fmt="[x] %(message)s", level=logging.INFO, propagate=False):
        monkeypatch.setattr(sys, "stderr", first)
        log.info("one")
        first.close()  # as a test framework closes a captured stream
        monkeypatch.setattr(sys, "stderr", second)
        log.info("two")  # no '--- Logging error ---' for the closed stream
    assert second.getvalue() == "[x] two\n"
    assert (package.level, package.propagate, list(package.handlers)) == before
    log.info("three")  # INFO is no longer shown after the block
    assert "three" not in second.getvalue()

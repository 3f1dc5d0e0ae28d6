"""GPU-only checks: every test here is skipped on a machine without CUDA (the CPU CI), and runs the same
parity checks as the CPU suite on CUDA when a GPU is present."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)

"""GPU-only checks: every test here is skipped on a machine without CUDA (the CPU CI), and runs the same
parity checks as the CPU suite on CUDA when a GPU is present.

A test that builds a Megatron model in this process takes the `megatron_world` fixture: megatron-core's groups
for one rank and its CUDA RNG tracker seeded, as `MegatronActor` does. On CUDA megatron-core initialises weights
under `get_cuda_rng_tracker().fork()`, which raises "cuda rng state model-parallel-rng is not added" until
`model_parallel_cuda_manual_seed` has run."""

import pytest
import torch


def seeded_megatron_world(seed: int = 0) -> None:
    """megatron-core's parallel state for a world of one, then its RNG trackers seeded (`seed_everything`: on
    CUDA `model_parallel_cuda_manual_seed`, which needs the parallel state first)."""
    from luffy_megatron.compat.megatron_cpu import seed_everything
    from luffy_megatron.models.parallel import init_model_parallel

    init_model_parallel(1, 1)
    seed_everything(seed)


@pytest.fixture
def megatron_world():
    seeded_megatron_world(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)

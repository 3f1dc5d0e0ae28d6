"""The package's shape, checked from the source: the import graph (every import, those inside functions
included) has no cycle and points only downwards through the layers that docs/architecture.md lists; no
function is longer than 80 lines unless the allowlist below says why; imports are at the top of the module,
unless the import says why it is lazy (`# lazy: ...`: the module it loads pulls in Megatron, vLLM, Ray or
Transformer Engine, which the importing process may not have or need)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "luffy_megatron"
MAX_FUNCTION_LINES = 80

# function (path:qualified name) -> why it may be longer than MAX_FUNCTION_LINES
LONG_FUNCTIONS: dict[str, str] = {}


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def imported_modules(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement names (`from a import b` names the module a.b if it exists)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE + ".") and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(imported_modules(module, node))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(MODULES):
        if start not in state and (found := visit(start)):
            return found
    return None


def documented_layers(text: str) -> list[list[str]]:
    """The layers listed in docs/architecture.md between `<!-- layers -->` and `<!-- /layers -->`, top first:
    one line each, `N. name, name` where a name is a package or module below luffy_megatron (`(root)` for the
    package's own __init__)."""
    block = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert block, "docs/architecture.md has no <!-- layers --> ... <!-- /layers --> block"
    layers = []
    for line in block.group(1).splitlines():
        m = re.match(r"\s*\d+\.\s+(.*)", line)
        if m:
            names = [n.strip(" `") for n in m.group(1).split(":")[0].split(",")]
            layers.append([PACKAGE if n == "(root)" else f"{PACKAGE}.{n}" for n in names if n])
    return layers


def layer_of(module: str, layers: list[list[str]]) -> tuple[int, str]:
    """(layer index, the entry that holds `module`): the longest entry that is the module or a package above it."""
    best = None
    for index, names in enumerate(layers):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_documented_layers():
    layers = documented_layers((REPO / "docs" / "architecture.md").read_text())
    wrong = []
    for module, targets in sorted(import_graph().items()):
        here, entry = layer_of(module, layers)
        for target in sorted(targets):
            there, target_entry = layer_of(target, layers)
            same_folder = target_entry.split(".")[:2] == entry.split(".")[:2]  # e.g. config.sections, config.errors
            if there < here or (there == here and not same_folder):
                wrong.append(
                    f"{module} (layer {here + 1}, {entry}) imports {target} (layer {there + 1}, {target_entry})"
                )
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_every_package_module_is_in_a_documented_layer():
    layers = documented_layers((REPO / "docs" / "architecture.md").read_text())
    listed = {name for names in layers for name in names}
    stale = sorted(n for n in listed if n not in MODULES)
    assert not stale, f"docs/architecture.md lists what does not exist: {stale}"
    for module in MODULES:
        layer_of(module, layers)


def long_functions() -> dict[str, int]:
    out = {}
    for root in (PACKAGE, "tools"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for qualname, node in walk_functions(tree):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[f"{path.relative_to(REPO)}:{qualname}"] = lines
    return out


def walk_functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from walk_functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from walk_functions(node, prefix + node.name + ".")


def test_no_function_is_over_80_lines_unless_allowlisted():
    found = long_functions()
    over = {name: lines for name, lines in found.items() if name not in LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them, or allowlist with a reason): {over}"
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"allowlisted functions that are no longer long (remove them from the list): {stale}"


def lazy_imports_without_reason(source: str) -> list[int]:
    """Line numbers of the imports inside functions (or classes) that no `# lazy: ...` comment explains. A comment
    on the line above a run of consecutive import statements, or on any of their lines, covers the whole run."""
    lines = source.splitlines()
    tree = ast.parse(source)
    missing = []
    for holder in ast.walk(tree):
        if holder is tree:
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(holder, field, None)
            if not isinstance(block, list):
                continue
            run: list[ast.stmt] = []
            for stmt in block + [None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run.append(stmt)
                    continue
                if run:
                    said = lines[max(run[0].lineno - 2, 0) : run[-1].end_lineno]
                    if not any("# lazy:" in line for line in said):
                        missing += [node.lineno for node in run]
                run = []
    return sorted(missing)


def test_imports_inside_functions_say_why():
    """Imports belong at the top of the module; inside a function only with a reason, e.g. the module loads
    Megatron, vLLM, Ray or Transformer Engine, which the importing process may not have or need."""
    hidden = []
    for module, path in MODULES.items():
        hidden += [f"{path.relative_to(REPO)}:{line}" for line in lazy_imports_without_reason(path.read_text())]
    assert not hidden, (
        "imports inside functions: move them to the top, or say why with a `# lazy: ...` comment:\n" + "\n".join(hidden)
    )


@pytest.mark.parametrize("name", ["train", "train_step"])
def test_the_loop_and_the_step_fit_on_one_screen(name):
    tree = ast.parse((REPO / PACKAGE / "train" / "loop.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    assert node.end_lineno - node.lineno + 1 <= 60, f"train/loop.py:{name} is {node.end_lineno - node.lineno + 1} lines"


def test_the_checks_find_what_they_look_for():
    """The checkers themselves: a cycle, an upward import and a long function are found."""
    graph = {m: set() for m in MODULES}
    first, second = sorted(MODULES)[:2]
    graph[first].add(second)
    graph[second].add(first)
    assert find_cycle(graph) in ([first, second, first], [second, first, second])
    layers = documented_layers("<!-- layers -->\n1. train: the driver\n2. algo, data\n<!-- /layers -->")
    assert layers == [[f"{PACKAGE}.train"], [f"{PACKAGE}.algo", f"{PACKAGE}.data"]]
    assert layer_of(f"{PACKAGE}.algo.loss", layers) == (1, f"{PACKAGE}.algo")
    assert lazy_imports_without_reason("def f():\n    import os\n    import re\n") == [2, 3]
    assert lazy_imports_without_reason("def f():\n    # lazy: why\n    import os\n    import re\n") == []
    assert lazy_imports_without_reason("import os\n\ndef f():\n    x = 1\n    import re  # lazy: why\n") == []
    tree = ast.parse("def f():\n" + "    x = 1\n" * 90)
    assert [n for n, node in walk_functions(tree) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES] == ["f"]

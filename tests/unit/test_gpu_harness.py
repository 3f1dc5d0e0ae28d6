"""N7: the GPU tests must reach the code they test. The torchrun scripts of tests/dist run Megatron with CUDA
tensors on a GPU host, so their world is NCCL there (`ensure_process_group`), never a hard-coded gloo; and the
tests/gpu tests that build a Megatron model in their own process seed megatron-core's CUDA RNG tracker first,
without which its GPU weight init raises "cuda rng state model-parallel-rng is not added"."""

import ast
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
DIST_SCRIPTS = sorted(p for p in (TESTS / "dist").glob("*.py") if not p.name.startswith("test_"))
GPU_TESTS = sorted((TESTS / "gpu").glob("test_*.py"))
BUILDS_A_MODEL = {"build_model_chunks", "build_gpt_model", "MegatronActor"}


def _called(node: ast.AST) -> set[str]:
    names = set()
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        f = call.func
        names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def _hard_coded_backends(tree: ast.AST) -> list[str]:
    out = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        backend = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "backend"), None)
        if name == "init_process_group" and isinstance(backend, ast.Constant):
            out.append(f"line {call.lineno}: init_process_group({backend.value!r})")
    return out


def test_torchrun_scripts_make_their_world_for_the_device():
    assert DIST_SCRIPTS, "no torchrun scripts found"
    problems = []
    for path in DIST_SCRIPTS:
        tree = ast.parse(path.read_text())
        problems += [f"{path.name} {p}" for p in _hard_coded_backends(tree)]
        calls = _called(tree)
        makes_world = calls & {"init_process_group", "init_model_parallel"} or calls & BUILDS_A_MODEL
        if makes_world and "ensure_process_group" not in calls and "init_process_group" in calls:
            problems.append(f"{path.name}: init_process_group without ensure_process_group")
    assert not problems, "a backend fixed whatever the device (gloo with CUDA tensors on a GPU host):\n" + "\n".join(
        problems
    )


def test_the_scan_catches_a_hard_coded_gloo():
    bad = ast.parse('import torch.distributed as dist\ndist.init_process_group("gloo")\n')
    good = ast.parse('dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")\n')
    assert _hard_coded_backends(bad) == ["line 2: init_process_group('gloo')"]
    assert _hard_coded_backends(good) == []


def test_gpu_tests_that_build_megatron_in_process_take_the_seeded_world():
    problems = []
    for path in GPU_TESTS:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            calls = _called(fn)
            if not calls & BUILDS_A_MODEL:
                continue
            if "megatron_world" not in [a.arg for a in fn.args.args]:
                problems.append(f"{path.name}::{fn.name} builds a model without the megatron_world fixture")
            if "init_model_parallel" in calls:
                problems.append(f"{path.name}::{fn.name} makes its own unseeded megatron world")
    assert not problems, "\n".join(problems)


@pytest.fixture
def cuda_rng_on_the_host(monkeypatch):
    """torch.cuda as megatron-core's seeding sees it on a GPU, its RNG states kept on the host."""
    from megatron.core.tensor_parallel import random as mcore_random

    from luffy_megatron.models import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *args: torch.get_rng_state())
    monkeypatch.setattr(mcore_random, "_set_cuda_rng_state", lambda *args, **kw: None)
    monkeypatch.setattr(parallel, "bind_local_device", lambda: None)
    yield mcore_random
    mcore_random.get_cuda_rng_tracker().reset()


def test_seeded_world_adds_the_model_parallel_rng_state(cuda_rng_on_the_host):
    from megatron.core import parallel_state as ps

    from tests.gpu.conftest import seeded_megatron_world

    ps.destroy_model_parallel()  # the seeding reads the TP rank: the world must come first
    cuda_rng_on_the_host.get_cuda_rng_tracker().reset()
    seeded_megatron_world(0)
    states = cuda_rng_on_the_host.get_cuda_rng_tracker().get_states()
    assert "model-parallel-rng" in states and "data-parallel-rng" in states
    assert ps.get_tensor_model_parallel_world_size() == 1

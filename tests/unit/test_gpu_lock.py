"""The GPU container's lock file resolves (review N2): pip's resolver, for the container's Python on linux x86_64,
accepts requirements/gpu.lock and refuses the same lock with one conflicting pin; the packages built from source in
the container accept the lock's torch. Needs the package index (PyPI) and a Python 3.12 interpreter (pip evaluates
markers with the Python it runs in; tools/lock_gpu.py makes a venv of it with a pinned pip under ~/.cache): without
either the test fails, saying so; it never skips. About 25-40 s (two pip resolves at once)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools import lock_gpu

# The conflicting pin of the negative case: vllm 0.32.0 requires torch==2.13.0.
CONFLICT = ("torch", "2.13.0", "2.12.0")


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[str, lock_gpu.Resolution]:
    """The lock and the lock with one conflicting pin, resolved at once (two pip processes)."""
    try:
        lock_gpu.check_index()
        lock_gpu.lock_python()  # made once, before the two resolves share it
    except (lock_gpu.IndexUnreachable, lock_gpu.NoLockPython) as err:
        pytest.fail(str(err), pytrace=False)
    name, pinned, other = CONFLICT
    text = lock_gpu.GPU_LOCK.read_text()
    assert f"\n{name}=={pinned}\n" in text, f"the lock no longer pins {name}=={pinned}: update CONFLICT"
    conflict = tmp_path_factory.mktemp("lock") / "conflict.lock"
    conflict.write_text(text.replace(f"\n{name}=={pinned}\n", f"\n{name}=={other}\n"))
    files = {"lock": lock_gpu.GPU_LOCK, "conflict": conflict}
    with ThreadPoolExecutor(len(files)) as pool:
        done = {key: pool.submit(lock_gpu.resolve, path) for key, path in files.items()}
        return {key: future.result() for key, future in done.items()}


@pytest.mark.parametrize("case", ["lock", "conflict"])
def test_pip_resolves_the_lock_and_refuses_a_conflict(resolutions, case):
    result = resolutions[case]
    if case == "lock":
        assert result.ok, f"pip cannot resolve requirements/gpu.lock:\n{result.output[-4000:]}"
        assert result.pins == lock_gpu.read_pins(lock_gpu.GPU_LOCK)  # nothing added, nothing changed
    else:
        assert not result.ok, "pip accepted torch==2.12.0 beside vllm==0.32.0"
        assert "ResolutionImpossible" in result.output and "torch 2.12.0" in result.output


def test_lock_satisfies_its_inputs():
    """requirements/gpu.txt (and the core requirements it includes) is what the lock was made from: a range or pin
    edited there without `make lock-gpu` fails here."""
    lock = lock_gpu.read_pins(lock_gpu.GPU_LOCK)
    inputs = lock_gpu.GPU_IN.read_text().splitlines()
    inputs += (lock_gpu.ROOT / "requirements.txt").read_text().splitlines()
    for line in inputs:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        have = lock.get(canonicalize_name(req.name))
        assert have is not None and req.specifier.contains(have, prereleases=True), f"{line}: the lock has {have}"


def test_source_builds_accept_the_lock():
    lock = lock_gpu.read_pins(lock_gpu.GPU_LOCK)
    try:
        metas = lock_gpu.source_metas()
    except OSError as err:  # urllib's errors are OSErrors
        pytest.fail(f"cannot read the source packages' sdists from {lock_gpu.INDEX_URL}: {err}", pytrace=False)
    assert [m.name for m in metas] == ["transformer-engine-torch"]
    assert lock["transformer-engine"] == metas[0].version  # the meta package and the extension: one release
    torch_reqs = [r for m in metas for r in m.requires + m.build_requires if r.name == "torch"]
    assert len(torch_reqs) == 2 and all(r.specifier.contains(lock["torch"]) for r in torch_reqs)
    assert lock_gpu.check_source_builds(lock, metas) == []


def _te_meta(torch_range: str) -> lock_gpu.SourceMeta:
    reqs = [f"torch{torch_range}", "einops", "packaging", "transformer_engine_cu12==2.11.0"]
    return lock_gpu.SourceMeta(
        "transformer_engine_torch", "2.11.0", [Requirement(r) for r in reqs], [Requirement(f"torch{torch_range}")]
    )


def test_source_check_refuses_a_torch_outside_the_range():
    lock = {"torch": "2.13.0", "einops": "0.8.2", "packaging": "26.4", "nvidia-cuda-runtime": "13.0.96"}
    lock["transformer-engine-cu13"] = "2.11.0"
    assert lock_gpu.check_source_builds(lock, [_te_meta(">=2.1")]) == []
    problems = lock_gpu.check_source_builds(lock, [_te_meta(">=2.1,<2.13")])
    assert len(problems) == 2 and all("torch" in p and "2.13.0" in p for p in problems)  # run and build
    # the core library must match the source's version, for torch's CUDA major
    assert lock_gpu.check_source_builds({**lock, "transformer-engine-cu13": "2.10.0"}, [_te_meta(">=2.1")])
    assert lock_gpu.check_source_builds({**lock, "nvidia-cuda-runtime": "12.9.79"}, [_te_meta(">=2.1")])
    assert lock_gpu.check_source_builds({k: v for k, v in lock.items() if k != "einops"}, [_te_meta(">=2.1")])


def test_dockerfile_matches_the_lock():
    """The container's Python is the one the lock was resolved for; its CUDA toolkit has the lock's CUDA major."""
    dockerfile = lock_gpu.DOCKERFILE.read_text()
    (python,) = re.findall(r"^ARG PYTHON_VERSION=(\S+)", dockerfile, re.M)
    assert python == lock_gpu.PYTHON_VERSION
    (image,) = re.findall(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+)\.", dockerfile, re.M)
    assert int(image) == int(lock_gpu.read_pins(lock_gpu.GPU_LOCK)["nvidia-cuda-runtime"].split(".")[0])
    for needed in ("requirements/gpu.lock", "requirements/gpu-source.txt", "--no-build-isolation"):
        assert needed in dockerfile


def test_index_unreachable_fails_with_a_message(monkeypatch):
    monkeypatch.setattr(lock_gpu, "INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(lock_gpu.IndexUnreachable, match="cannot be reached.*connect this machine"):
        lock_gpu.check_index(timeout=5)


def test_lock_file_is_pinned_and_sorted():
    lines = [ln for ln in Path(lock_gpu.GPU_LOCK).read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==\S+", ln) for ln in lines)
    names = [ln.split("==")[0] for ln in lines]
    assert names == sorted(names)
    assert "make lock-gpu" in lock_gpu.GPU_LOCK.read_text()

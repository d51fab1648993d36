# Every target works on a fresh machine with Python >= 3.10 and pip: it creates or refreshes .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/sinusoid.py
WORKDIR ?= runs/sinusoid
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train evaluate test test-fast lint format bench bench-omniglot bench-gpu bench-quick tensorboard clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed  ## Create .venv and install the package with its test extra.

train: $(VENV)/.installed  ## Train the default config on all local devices (override CONFIG, WORKDIR, ARGS).
	$(PY) -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

evaluate: $(VENV)/.installed  ## Evaluate WORKDIR's latest checkpoint on held-out tasks (ARGS: --step=, --num_tasks=).
	$(PY) -m trainer.evaluate --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed  ## Run the whole test suite.
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed  ## Tests without the slow and multi-process ones.
	$(PY) -m pytest -m "not slow and not multiprocess" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check trainer tests configs launch bench
	$(VENV)/bin/ruff format --check trainer tests configs launch bench

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix trainer tests configs launch bench
	$(VENV)/bin/ruff format trainer tests configs launch bench

bench: $(VENV)/.installed  ## Benchmarks: writes a table to stdout and bench/results/.
	$(PY) -m bench.run $(ARGS)

bench-omniglot: $(VENV)/.installed  ## The Omniglot meta-step per inner solver, convolution and task mapping.
	$(PY) -m bench.omniglot $(ARGS)

bench-gpu: $(VENV)/.installed  ## Install JAX's CUDA build (JAX_CUDA=cuda12|cuda13 to choose), time the meta-step on one GPU (7-minute budget).
	$(PY) -m bench.accelerator --install --platform gpu $(ARGS)

bench-quick: $(VENV)/.installed
	$(PY) -m bench.run --quick $(ARGS)

tensorboard: $(VENV)/.installed  ## TensorBoard on the runs folder.
	$(VENV)/bin/tensorboard --logdir $(dir $(WORKDIR)) --bind_all

clean:  ## Remove caches and build outputs (keeps .venv and runs/).
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Two commands do all the set-up on a fresh machine:
#   make simulate   create .venv, install, run the default federated scenario (DP, phantom sites)
#   make test       create .venv, install, run lint, type checks and the test suite
#   make containers build the coordinator and hospital images (Podman) and run the study in
#                   them: 3 hospitals, 2 rounds under DP, then with HE (deploy/README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: simulate test test-slow lint bench containers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

simulate: $(STAMP)
	$(BIN)/python -m simulations.run default

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

containers: $(STAMP)
	$(BIN)/python -m deploy.containers all

bench: $(STAMP)
	$(BIN)/python -m benchmarks.model_throughput

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

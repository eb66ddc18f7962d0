# Every target that needs Python first makes sure .venv matches the lock file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install services test test-ts lint format demo bench bench-quick lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# The suite's services first: started if down, broker plugins enabled (deploy/local/services.sh).
test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-ts

# The TypeScript module SDK (typescript/): installed from its lock file, built, and its
# tests run with node's own test runner against the same broker and Python coordinator.
test-ts: $(STAMP) services
	cd typescript && npm ci --no-audit --no-fund && npm test

services:
	bash deploy/local/services.sh

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/sessionctl demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# Re-pin every dependency to what resolves today (needs network access to PyPI).
lock:
	$(PYTHON) -m venv /tmp/sessionbus-lock
	/tmp/sessionbus-lock/bin/python -m pip install --quiet --upgrade pip
	/tmp/sessionbus-lock/bin/python -m pip install --quiet -e '.[dev]'
	/tmp/sessionbus-lock/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf /tmp/sessionbus-lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

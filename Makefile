# Every target that needs Python first makes sure .venv matches the lock file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install services browser test test-ts screenshots lint format demo bench bench-quick lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# The suite's services first: started if down, broker plugins enabled (deploy/local/services.sh);
# the console's browser tests need Debian's Chromium (deploy/local/browser.sh installs it).
test: $(STAMP) services browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-ts

# The TypeScript module SDK (typescript/): installed from its lock file, built, and its
# tests run with node's own test runner against the same broker and Python coordinator.
test-ts: $(STAMP) services
	cd typescript && npm ci --no-audit --no-fund && npm test

services:
	bash deploy/local/services.sh

browser:
	bash deploy/local/browser.sh

# The README's pictures of the console (docs/screenshots/*.png), taken by the browser
# tests' own fixtures against a real coordinator, broker and modules.
screenshots: $(STAMP) services browser
	$(BIN)/python -m pytest tests/console/browser -m screenshots -p no:cacheprovider

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

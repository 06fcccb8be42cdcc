# rustic: `make run` runs the example guild, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GUILD ?= guilds/hello/guild.yaml

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,redis,ray]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/rustic run $(GUILD)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/lifecycle.py
	$(BIN)/python bench/recovery.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

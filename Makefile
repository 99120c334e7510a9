# `make test` is the one test command: from a bare Python it builds .venv, installs the project with its
# dev extra, and runs the whole suite (CPU only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check hgrn_vision tests

clean:
	rm -rf $(VENV) .timm_tests .pytest_cache

# Two commands for a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv and run the main job on the built-in defaults
#   make test   set up .venv and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-work bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. pip, not uv: pip takes torch from local disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mammo-ray demo --config tune_configs/search_smoke.yaml

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_data.py

clean-work:
	rm -rf work

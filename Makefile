# Two commands for a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv and run the main job on the built-in defaults
#   make test   set up .venv and run the test suite (all tiers; CI runs it after `make lint`)
# And for everyday work:
#   make test-fast  the unit tests only: no Ray, no PostgreSQL, no training (tests/conftest.py checks the markers)
#   make lint       ruff (lint + format check) and mypy on mammo_ray/
#   make format     ruff's formatter and its safe fixes, in place
# After `make demo`:
#   make serve      serve the demo's registered ensemble (MODEL=... for another) on http://127.0.0.1:8000
#   make ui         the MLflow UI on the work directory's store, http://127.0.0.1:5000
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MODEL ?= models:/mammo-ray-demo-ensemble@champion
WORKDIR ?= work

.PHONY: demo test test-fast lint format install clean-work bench serve ui

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list or the pins change. pip, not uv: pip takes torch from local disk.
# constraints.txt pins every package at the version the tests passed with (scripts/lock_constraints.py);
# the container image and the cluster launcher install with the same file.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mammo-ray demo --config tune_configs/search_smoke.yaml

serve: install
	$(BIN)/mammo-ray serve --model $(MODEL) --workdir $(WORKDIR)

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORKDIR))/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# scripts/run_tests.py: pytest's own exit status, without the interpreter's finalization (a rare SIGSEGV in
# native libraries' destructors after the summary); -X faulthandler prints every thread's stack on a crash.
test: install
	$(BIN)/python -X faulthandler scripts/run_tests.py

test-fast: install
	$(BIN)/python -X faulthandler scripts/run_tests.py -m "not ray and not slow and not gpu" -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/bench_data.py

clean-work:
	rm -rf work

# The two commands of the README:  `make demo`  and  `make test`.
# Both create the virtual environment on first use (no GPU, no download beyond PyPI packages).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Optional extra index for torch, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on a CPU-only box
TORCH_INDEX ?=

.PHONY: setup demo test test-all lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-psm demo --output demo-out --overwrite

# .ci/run runs these same steps (setup, lint, pytest)
test: lint
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache

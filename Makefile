# The two set-up commands of the README, for a fresh machine:
#   make run    install everything into .venv, then run the main job (for now: a short demo)
#   make test   install everything into .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint

install: $(VENV)/.installed

# Torch is installed explicitly, and only where the environment has none: the package asks
# for a range (torch>=2.4) so a GPU user's own build stays, and on a machine without torch
# torch==2.13.0 is the CPU build; an open range would fetch several GB of CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

run: install
	$(BIN)/tformer demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

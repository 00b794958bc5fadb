# The two set-up commands of the README, for a fresh machine:
#   make run    install everything into .venv, then train a character-level GPT on the
#               built-in Shakespeare for about 5 minutes, report validation loss, print a sample
#   make test   install everything into .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint

install: $(VENV)/.installed

# Torch is installed explicitly, and only where the environment has none: the package asks
# for a range (torch>=2.5) so a GPU user's own build stays, and on a machine without torch
# torch==2.13.0 is the CPU build; an open range would fetch several GB of CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# The main job; each `make run` writes a new run directory, so nothing is overwritten.
RUN_DIR ?= runs/shakespeare-$(shell date +%Y%m%d-%H%M%S)
run: install
	$(BIN)/tformer train --data shakespeare --tokenizer char --out $(RUN_DIR) \
		--n-layers 6 --n-heads 6 --d-model 192 --context 128 --batch-size 32 \
		--steps 800 --lr 2e-3 --min-lr 2e-4 --warmup-steps 50 --eval-every 100 \
		--checkpoint-every 200 --sample-tokens 500

# The import contracts first (pyproject.toml: every import points down, no circles), then
# the tests, on two pytest-xdist workers: much of the suite waits on the processes it
# starts. Each test file goes to one worker (--dist loadfile), so a file's servers and
# checkpoints are made once and its tests that share a port never overlap. Two workers of
# two OpenMP threads each share the machine's cores: a thread that waits spins (libgomp's
# default), taking the core another worker needs, so waiting threads sleep soon here
# (GOMP_SPINCOUNT): the suite took 6.4 minutes so against 10.1, one lab test 17 s
# against 240 (docs/LOG.md). Training and the benchmarks keep the default.
test: install
	$(BIN)/lint-imports
	GOMP_SPINCOUNT=10000 $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

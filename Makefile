# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# GPU users pick their own PyTorch build, e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test venv install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The torch build is installed first and on its own so that the package's `torch>=2.4`
# requirement is already satisfied and pip never resolves a CUDA wheel by itself.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/vcell demo --overwrite

# One pytest worker per core, up to 4, a test file per worker at a time (module fixtures are built once),
# in the order tests/conftest.py gives; `make test PYTEST_ARGS=` runs it in one process. Idle OpenMP
# threads sleep instead of spinning, which otherwise takes CPU from the other worker.
PYTEST_ARGS ?= -n logical --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

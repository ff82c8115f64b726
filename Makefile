# Two commands matter: `make demo` and `make test`. Each sets up .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a CUDA machine, set TORCH_SPEC to a plain "torch torchvision" (or the wheel index your driver needs).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=20

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python scripts/bench.py all

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache

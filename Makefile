# Two commands on a fresh machine:  make demo   and   make test
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.metattn-installed

.PHONY: install demo test lint bench-sinusoid clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job on an embedded default (no data download): MAML on the sinusoids.
demo: $(STAMP)
	$(BIN)/python -m metattn.demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

## The whole test suite (CPU, a few minutes).
test: $(STAMP) lint
	$(BIN)/pytest -q

bench-sinusoid: $(STAMP)
	$(BIN)/python benchmarks/sinusoid.py

clean:  # the environment only: runs/ holds your results (delete it yourself)
	rm -rf $(VENV)

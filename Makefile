# Two commands on a fresh machine: `make run` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= params/tiny.yaml
STAMP  := $(VENV)/.colquant-installed

.PHONY: setup run test test-package test-notebooks lab clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m colquant run $(PARAMS)

test: test-package

test-package: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

test-notebooks: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

lab: setup
	$(BIN)/jupyter lab notebooks

clean-outputs:
	rm -rf outputs/*

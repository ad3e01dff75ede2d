# Two commands on a fresh machine: `make run` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= params/tiny.yaml
STAMP  := $(VENV)/.colquant-installed

.PHONY: setup run test test-package test-notebooks test-twin notebooks lab clean-outputs

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

# Quiet, offline, deterministic settings for executing notebooks as regression tests: no progress
# bars or timestamped library logs in outputs, and a fresh output directory every time.
NB_ENV := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 AR_LOG_LEVEL=ERROR TRANSFORMERS_VERBOSITY=error \
	HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore

test: test-package test-notebooks test-twin

test-package: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -m "not twin"

test-notebooks: setup
	scratch=$$(mktemp -d) && $(NB_ENV) COLQUANT_OUTPUT_ROOT=$$scratch $(BIN)/python -m pytest --nbval \
		notebooks --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider; \
		status=$$?; rm -rf $$scratch; exit $$status

# The real profile end to end, offline: builds the hub twin (scripts/build_hub_twin.py) in a temp dir,
# runs params/twin.yaml through notebooks 01-06 against it and checks REPORT.md (tests/test_twin.py).
test-twin: setup
	$(NB_ENV) $(BIN)/python -m pytest tests/test_twin.py -m twin -p no:cacheprovider

# Re-execute the committed notebooks (the nbval reference) after a change that moves results.
notebooks: setup
	$(NB_ENV) $(BIN)/python -m colquant notebooks

lab: setup
	$(BIN)/jupyter lab notebooks

clean-outputs:
	rm -rf outputs/*

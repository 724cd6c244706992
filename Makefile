# The two commands of README.md: `make quickstart` and `make test`. Both create the virtual
# environment and install requirements.txt when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fct-installed

.PHONY: venv quickstart test docs reproduce-cpu regression-quick regression-cpu chain-cpu bench clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m fct.quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests

# docs/configuration.md, generated from the config classes in fct/config/ (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m fct.config.reference

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_train.py

clean-runs:
	rm -rf runs/quickstart

# The published FCT/FastFill table at CPU scale on ../shared/data/tinyimagenet100-32 (about an hour here).
reproduce-cpu: $(STAMP)
	$(PY) -m fct.reproduce

# Weight interpolation (BCWI) and negative flips on digits, both update scenarios (a few minutes).
regression-quick: $(STAMP)
	$(PY) -m fct.regression.quick

regression-cpu: $(STAMP)
	$(PY) -m fct.regression.quick --suite tinyimagenet

chain-cpu: $(STAMP)
	$(PY) -m fct.chain_cpu

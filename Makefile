# Two entry points for a fresh clone with only python3: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in .venv; demo installs only the runtime dependencies, test adds the
# test extra (torch, transformers, tensorboard, ...).
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# The demo: the default GPT (4 layers x 192, char-level, embedded Python corpus), trained for DEMO_STEPS steps.
CONFIG ?= gpt
DEMO_STEPS ?= 1200

.PHONY: demo test test-slow test-all lint format bench report clean-demo

$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m effjax.main --config=$(CONFIG) --workdir=$(WORKDIR) --config.train.steps=$(DEMO_STEPS)
	$(PY) -m effjax.main --workdir=$(WORKDIR) --mode=sample --prompt='def ' --max_new_tokens=300 --temperature=0.7

# `make test`: every test but the end-to-end runs marked `slow` (minutes); `make test-slow` those; CI runs both
test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 -m 'not slow' tests

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -n 2 -m slow tests

test-all: $(VENV)/.test
	$(PY) -m pytest -q -n 2 tests

# pyproject.toml's [tool.ruff] settings on the whole tree (tests/test_lint.py runs the same checks); `make format`
# rewrites the tree as the formatter wants it
lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.test
	$(PY) -m ruff format .

bench: $(VENV)/.test
	$(PY) -m experiments.bench_train

# REPORT.md's tables, derived numbers (results/report.json) and figures from experiments/results/ (no training)
report: $(VENV)/.runtime
	$(PY) -m experiments.report

clean-demo:
	rm -rf $(WORKDIR)

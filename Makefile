# Two entry points for a fresh clone with only python3: `make demo` and `make test`.
# Each creates (or reuses) the virtualenv in .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
CONFIG ?= configs/gpt.py

.PHONY: demo test bench report clean-demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m effjax.main --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m effjax.main --config=$(CONFIG) --workdir=$(WORKDIR) --mode=sample \
	  --prompt='def ' --max_new_tokens=300 --temperature=0.7

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.installed
	$(PY) -m experiments.bench_train

# REPORT.md's tables, derived numbers (results/report.json) and figures from experiments/results/ (no training)
report: $(VENV)/.installed
	$(PY) -m experiments.report

clean-demo:
	rm -rf $(WORKDIR)

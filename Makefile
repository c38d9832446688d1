# Everything installs itself into .venv: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m respworkers.demo

lint: $(STAMP)
	$(PY) -m ruff check respworkers tests benchmarks
	$(PY) -m mypy

test: $(STAMP)
	$(PY) -m ruff check respworkers tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

# The suite (every load and its references in one run, a few minutes on 2 cores; JSON in
# benchmarks/results/latest.json), then the broker core alone and the job-file parser.
# Options for the suite: make bench BENCH_ARGS="--rounds 1". Scale tests: see benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) benchmarks/suite.py $(BENCH_ARGS)
	$(PY) benchmarks/core.py
	$(PY) benchmarks/core.py --journal sqlite
	$(PY) benchmarks/jobfile.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

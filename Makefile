# Everything installs itself into .venv: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

COMPILED := build/compiled

.PHONY: venv demo test lint bench clean compiled test-compiled

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
	$(MAKE) --no-print-directory test-compiled

# The optional compiled build (README: Compiled build): the broker's hot modules (setup.py's
# HOT) compiled with mypyc into build/compiled, next to a copy of the package. The source
# tree stays pure Python; PYTHONPATH=build/compiled runs the compiled broker.
compiled: $(STAMP)
	rm -rf $(COMPILED) && mkdir -p $(COMPILED) && cp -r respworkers $(COMPILED)/
	cd $(COMPILED) && RESPWORKERS_COMPILE=1 $(abspath $(PY)) $(abspath setup.py) -q build_ext --inplace \
		>build.log 2>&1 || { cat build.log; exit 1; }

# The tests that drive the broker (its core, the wire, the journal, real processes end to
# end, faults and restarts), run again against the compiled build.
COMPILED_TESTS := tests/test_compiled.py tests/test_broker_core.py tests/test_protocol.py \
	tests/test_journal.py tests/test_e2e.py tests/test_restart.py tests/test_faults.py tests/test_fuzz.py \
	tests/test_prefetch.py
test-compiled: compiled
	# The pytest script, not python -m: -m would put this folder (the pure package) first.
	RESPWORKERS_EXPECT_COMPILED=1 PYTHONPATH=$(abspath $(COMPILED)) $(VENV)/bin/pytest -q $(COMPILED_TESTS)

# The suite (every load and its references in one run, a few minutes on 2 cores; JSON in
# benchmarks/results/latest.json), then the broker core alone and the job-file parser.
# Options for the suite: make bench BENCH_ARGS="--rounds 1". Scale tests: see benchmarks/RESULTS.md.
bench: compiled
	$(PY) benchmarks/suite.py $(BENCH_ARGS)
	$(PY) benchmarks/core.py
	$(PY) benchmarks/core.py --journal sqlite
	PYTHONPATH=$(abspath $(COMPILED)) $(PY) benchmarks/core.py --label compiled
	PYTHONPATH=$(abspath $(COMPILED)) $(PY) benchmarks/core.py --journal sqlite --label compiled
	$(PY) benchmarks/jobfile.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build

# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the pinned dev requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench bench-quick clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/runstate demo --out runstate-demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -n 2 -q tests

# For iterating: everything but the end-to-end tests that train, kill and resume real processes
# (marked e2e) and the loader matrix; `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not e2e" --ignore=tests/test_loader_matrix.py tests

# Speed, memory and scale figures (docs/performance.md), ending with issue 20's TARGETS table (each run's
# ratios go to .bench-tmp/targets-history.jsonl; the table pools the last 3 runs) and docs/perf-scale.png.
# About 10-15 minutes on 2 idle cores (estimated, not timed); far longer on a loaded machine: at load average 8-9,
# save_load.py alone took 8-10 minutes and scale.py (up to 4 GiB: ~9 GiB of RAM, ~8 GiB of disk) 14.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The same scripts at small sizes with few repetitions, docs/perf-scale.png left alone: a smoke run
# (save_load.py 80 s and scale.py 210 s of it at load average 8).
bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# Fault injection, fuzzing and the concurrent reader/writer test (tests/test_fault_injection.py,
# tests/test_untrusted.py, tests/test_hardening_manager.py) with ten
# times the kill trials and fuzz cases of `make test`; -rP prints each test's counts.
.PHONY: stress fuzz
stress: $(STAMP)
	$(PY) -m pytest -n 2 -q -rP --stress tests/test_fault_injection.py tests/test_untrusted.py \
		tests/test_hardening_manager.py::test_a_reader_next_to_a_deleting_writer_always_finds_a_checkpoint

# The atheris target for the reader (fuzz/README.md); atheris is installed on demand.
fuzz: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q atheris
	mkdir -p fuzz/corpus
	$(PY) fuzz/fuzz_reader.py fuzz/corpus -max_total_time=600 -rss_limit_mb=1024 -max_len=65536 -len_control=0 -artifact_prefix=fuzz/

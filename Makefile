# L7FP: `make demo` and `make test` set everything up on a fresh Debian machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.l7fp-ready
PYTEST_ARGS ?=
# make test runs the suite in this many pytest-xdist workers, a test file per worker at a
# time (most of a mesh test is waiting: docs/test-time.md); TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
DEMO_NAME ?= demo

.PHONY: all setup demo test test-fast lint bench bench-quick clean

all: test

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/setup-host.sh
	VENV=$(VENV) bash scripts/setup-host.sh
	touch $@

demo: setup
	$(VENV)/bin/l7fp demo --name $(DEMO_NAME)

test: setup lint
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not kernel and not mesh and not envoy" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy xds_server fastpath mesh benchmarks

bench: setup
	$(VENV)/bin/l7fp bench

bench-quick: setup
	$(VENV)/bin/l7fp bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

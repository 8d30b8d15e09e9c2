# L7FP: `make demo` and `make test` set everything up on a fresh Debian machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.l7fp-ready
PYTEST_ARGS ?=
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
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

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

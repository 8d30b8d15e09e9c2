# L7FP: `make demo` and `make test` set everything up on a fresh Debian machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.l7fp-ready
PYTEST_ARGS ?=
# make test runs the suite in this many pytest-xdist workers, a test file per worker at a
# time (most of a mesh test is waiting: docs/test-time.md), then the tests marked `alone`
# (wall-clock bounds a busy neighbour would move) one after the other; TEST_WORKERS=0: one process
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

# both parts run; each may find no test of its kind in PYTEST_ARGS' selection (pytest's 5)
test: setup lint
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile -m "not alone" $(PYTEST_ARGS); \
	  par=$$?; $(PY) -m pytest -q -rs -m alone $(PYTEST_ARGS); alone=$$?; \
	  for rc in $$par $$alone; do [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc; done

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

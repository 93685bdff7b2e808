# safehaven: `make run` does the whole set-up and a nightly run; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SAFEHAVEN_HOME ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
PATIENTS ?= 2000

.PHONY: install run ui test bench lint clean deploy-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev,deploy]"
	touch $@

# The project's modules (the haven's, the benchmark's, the tests') compiled to bytecode, as an
# installed package's are: where PYTHONDONTWRITEBYTECODE is set, every process (the CLI, the code
# server, each run's worker, a test's child) would otherwise compile them from source at its start
# (benchmarks/README.md, "What runs"). Checked against each source's hash, not its time, so an
# edited module is never run from older bytecode; a module that cannot be compiled is named, and the
# install goes on (a syntax error then fails where the module is imported, as without bytecode).
install: $(VENV)/.installed
	@$(BIN)/python -m compileall -q --invalidation-mode checked-hash safehaven assets resources benchmarks tests \
		|| echo "make install: some modules were not compiled to bytecode (see above)"
	@mkdir -p $(DAGSTER_HOME) && cp -n deploy/dagster.yaml $(DAGSTER_HOME)/dagster.yaml 2>/dev/null || true

run: install
	$(BIN)/safehaven run --demo-patients $(PATIENTS)

ui: install
	$(BIN)/dagster dev -w workspace.yaml

# The whole suite, slow tier included, on $(TEST_WORKERS) pytest-xdist workers; each test module
# stays on one worker (one xdist group; the crash matrix is split in two), so a module's shared
# run is built once, and the longest groups start first (tests/conftest.py). For a targeted run,
# call pytest directly (one process); `pytest -m "not slow"` is the quick tier.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

bench: install
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The production deployment (deploy/): the compose file (schema + the haven's rules; also
# `docker compose config` where a compose CLI exists) and every Dagster instance and launcher
# configuration, validated by Dagster with no Docker engine or cluster.
deploy-check: install
	$(BIN)/python deploy/check.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# keyledger: `make demo` and `make test` set up everything a fresh Debian machine lacks.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyledger-installed
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
DEMO_HOME ?= demo-home
DEMO_PORT ?= 5006
DEMO_PRINCIPAL ?= security-lead
NOTEBOOK_PORT ?= 8888
NOTEBOOK_ARGS ?=
MORNING := notebooks/04-security-engineers-morning.ipynb
# jupyter refuses to run as root without --allow-root (containers, CI)
ALLOW_ROOT := $(shell [ "$$(id -u)" -eq 0 ] && echo --allow-root)
# command -> Debian packages that provide it (comma-separated); chromium drives the browser tests
SYSTEM_TOOLS := softhsm2-util:softhsm2 pkcs11-tool:opensc openssl:openssl \
	chromium:chromium,fonts-dejavu-core node:nodejs npm:npm
CLIENTS := tests/clients/node_modules/.package-lock.json

.PHONY: setup system venv clients test lint demo notebook bench bench-service clean

setup: system venv clients

system:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $${pkg//,/ }"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

# Node's AWS SDK, the second-language client the key-service tests drive `keyledger serve` with
clients: $(CLIENTS)

$(CLIENTS): tests/clients/package.json tests/clients/package-lock.json
	npm ci --prefix tests/clients --no-audit --no-fund --loglevel=error

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,notebook]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests bench notebooks scripts

# The whole suite on 3 workers (2 cores: many tests wait on subprocesses, HSM files or a browser),
# one module per worker at a time; TEST_WORKERS=0 runs it in this process. Bytecode caching is on
# for the run (an inherited PYTHONDONTWRITEBYTECODE=1 made every worker re-rewrite every test
# module and every CLI/kernel subprocess recompile keyledger: ~11 s per worker, ~0.1 s per process).
#
# The tests' homes (tmp_path) live on tmpfs when the machine has one (/dev/shm): every DuckDB
# commit, journal group commit and SoftHSM2 token write calls fsync(2), which on a disk costs
# more wall time than the work itself (test_lifecycle: 85 s -> 59 s wall, 28 -> 24 s CPU,
# measured under load). The code paths are the same; only the disk's flush is skipped. The
# folder is the run's own (mktemp) and is removed afterwards, whatever the outcome. A tmpfs with
# less than TEST_TMPFS_MIN_KB free (containers often mount a 64 MB /dev/shm) is not used.
TEST_WORKERS ?= 3
# one module per worker at a time, in collection order (tests/conftest.py puts the long modules
# first); without --no-loadscope-reorder, pytest-xdist 3.x hands modules out by test count instead
TEST_DIST ?= --dist loadfile --no-loadscope-reorder
TEST_TMPFS ?= /dev/shm
TEST_TMPFS_MIN_KB ?= 4194304
test: setup
	$(BIN)/ruff check src tests bench notebooks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	@free=$$(df -Pk "$(TEST_TMPFS)" 2>/dev/null | awk 'NR==2 {print $$4}'); \
	if [ -d "$(TEST_TMPFS)" ] && [ -w "$(TEST_TMPFS)" ] && [ "$${free:-0}" -ge $(TEST_TMPFS_MIN_KB) ]; then \
		tmp=$$(mktemp -d "$(TEST_TMPFS)/keyledger-test.XXXXXX"); base="--basetemp=$$tmp/pytest"; \
	else tmp=""; base=""; fi; \
	echo "PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -n $(TEST_WORKERS) $(TEST_DIST) $$base"; \
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -n $(TEST_WORKERS) $(TEST_DIST) $$base; rc=$$?; \
	if [ -n "$$tmp" ]; then rm -rf "$$tmp"; fi; exit $$rc

# Seeds the demo estate once (reused after), then serves the dashboard until Ctrl-C.
demo: setup
	$(BIN)/keyledger demo --home $(DEMO_HOME)
	$(BIN)/keyledger dashboard --home $(DEMO_HOME) --principal $(DEMO_PRINCIPAL) --port $(DEMO_PORT)

# Seeds the demo estate once (like `make demo`), then opens JupyterLab on 127.0.0.1 with the
# morning notebook; KEYLEDGER_HOME points the notebooks at the estate. Ctrl-C stops it.
notebook: setup
	$(BIN)/keyledger demo --home $(DEMO_HOME)
	KEYLEDGER_HOME=$(abspath $(DEMO_HOME)) $(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 \
	  --ServerApp.port=$(NOTEBOOK_PORT) $(ALLOW_ROOT) $(NOTEBOOK_ARGS) $(MORNING)

bench: setup
	$(BIN)/python bench/run.py

# keyledger serve against moto (server mode) and CreateKey against bare python-pkcs11
# (docs/benchmarks.md, "Key service"); not part of `make test`.
bench-service: setup
	$(BIN)/python bench/service.py

clean:
	rm -rf $(VENV) $(DEMO_HOME) $(DEMO_HOME)-backups .pytest_cache .ruff_cache .import_linter_cache .grimp_cache

# Touchpoint: `make help` lists the targets. Everything runs from the project's own .venv.
SHELL := /bin/bash
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where the repo's code is found: generated protos, the platform library, and the repo root.
PTH := $(VENV)/lib/python3.11/site-packages/touchpoint-paths.pth
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON_SYS) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Touchpoint needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/libs/protos" "$(CURDIR)/libs/platform" > $(PTH)
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies

native: $(STAMP) ## compile the identity graph's hot path with mypyc into build/native (skipped when current)
	$(PY) scripts/build_native.py

run: $(STAMP) native ## start Postgres (embedded unless TOUCHPOINT_DATABASE_URL is set) and every service
	$(PY) -m touchpoint.platform.launcher

migrate: $(STAMP) ## apply every service's migrations to TOUCHPOINT_DATABASE_URL
	$(PY) -m touchpoint.platform.migrate_all

proto: $(STAMP) ## regenerate libs/protos from protos/
	PYTHON=$(PY) scripts/genproto.sh

proto-check: $(STAMP) ## fail when the committed generated code differs from a fresh generation
	@tmp=$$(mktemp -d) && PYTHON=$(PY) scripts/genproto.sh $$tmp >/dev/null && \
	  diff -r -x __pycache__ libs/protos/touchpoint $$tmp/touchpoint && echo "generated code is up to date"; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP) ## format and fix what ruff can
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP) ## mypy
	$(VENV)/bin/mypy libs/platform services tests bench

tools: ## system tools the tests use: promtool (Debian's prometheus package); kubectl comes with the machine image
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v kubectl >/dev/null || { echo "kubectl is missing (it ships with the machine image's google-cloud-cli)"; exit 1; }

test: $(STAMP) native tools proto-check lint typecheck ## install what is needed and run every check
	@# Each test has its own timeout (pyproject); this bounds the whole run, teardown included,
	@# so a hang fails in 25 minutes (SIGINT prints pytest's summary) instead of using up CI's 90.
	timeout -s INT -k 60 1500 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks (figures go to bench/RESULTS.md by hand)
	$(PY) -m bench.ingest
	$(PY) -m bench.identity
	$(PY) -m bench.attribution
	$(PY) -m bench.export

load: $(STAMP) ## bench/load: fixed offered rate against the gateway and the gRPC API, zero loss
	$(PY) -m bench.load --rate 100 --seconds 10

lock: ## rewrite requirements.lock from pyproject.toml in a scratch venv
	rm -rf /tmp/tp-lock && $(PYTHON_SYS) -m venv /tmp/tp-lock && /tmp/tp-lock/bin/pip install -q '.[dev]' && \
	  (echo '# Every package of the dev environment, pinned (pip freeze). `make lock` rewrites it from pyproject.toml.'; \
	   /tmp/tp-lock/bin/pip freeze --all --exclude touchpoint --exclude pip) > requirements.lock

clean: ## remove the venv and local data
	rm -rf $(VENV) .data .mypy_cache .ruff_cache build

.PHONY: help venv native run proto proto-check lint fmt typecheck tools test bench load migrate lock clean

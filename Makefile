# The two commands a new machine needs (see README): `make run` and `make test`. Both set everything up first;
# every step is idempotent, so a second run installs and downloads nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 0.0.0.0
PORT   ?= 8443
EDGE   ?= --edge
ARGS   ?=

.PHONY: run test setup system python assets lint bench test-deps

run: setup
	$(BIN)/tilemesh serve --host $(HOST) --port $(PORT) $(EDGE) $(ARGS)

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: system python assets

system:
	@bash scripts/install-system.sh

python: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

assets: $(STAMP)
	$(BIN)/python -m tilemesh.server.assets

# Test-only node packages (puppeteer-core drives Firefox ESR), installed from package-lock.json's integrity hashes.
FIREFOX_DRIVER := playwright/firefox/node_modules/.package-lock.json
test-deps: $(FIREFOX_DRIVER)

$(FIREFOX_DRIVER): playwright/firefox/package-lock.json
	npm ci --prefix playwright/firefox --no-audit --no-fund --loglevel=error
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

# Compare tilemesh with the research's baselines on emulated devices (root: namespaces, tc, cgroups).
SCENARIO ?= default
bench: setup
	$(BIN)/tilemesh bench $(SCENARIO)

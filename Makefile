# Two commands matter: `make demo` and `make test` (README "Quick start").
# Everything else here is what they are made of.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean bench browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run one face-swap job end to end on a local broker and print where the result is.
demo: $(STAMP)
	$(BIN)/facefleet demo

## Lint, type-check, check import contracts, then the whole test suite.
test: $(STAMP) browser lint typecheck
	$(BIN)/pytest -p no:cacheprovider

## Debian's Chromium + ChromeDriver for the status-page test (best effort: without root the
## test skips on a laptop; CI runs as root, and there a missing browser fails the test).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "note: could not install chromium; the browser test will skip (fail under CI=true)"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy helm/tools

unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not slow and not e2e"

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf var/demo .pytest_cache .mypy_cache .ruff_cache

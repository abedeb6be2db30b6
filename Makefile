# Two commands matter: `make demo` and `make test` (README "Quick start").
# Everything else here is what they are made of.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint typecheck unit install clean bench browser promtool torch-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run one face-swap job end to end on a local broker and print where the result is.
demo: $(STAMP)
	$(BIN)/facefleet demo

## Lint, type-check, check import contracts, then the whole test suite, then the GFPGAN
## .pth -> ONNX check in its own venv (the `torch` extra is ~6 GB and stays out of .venv).
test: $(STAMP) browser promtool lint typecheck torch-check
	$(BIN)/pytest -p no:cacheprovider

TORCH_VENV = .cache/torchvenv
$(TORCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet --upgrade pip
	$(TORCH_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(TORCH_VENV)/bin/pip install --quiet -e '.[torch,dev]'
	touch $@

## torch vs onnxruntime on a randomly initialised GFPGANv1Clean, through the converter.
torch-check: $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/pytest -p no:cacheprovider tests/models/test_convert_gfpgan.py

## Debian's Chromium + ChromeDriver for the status-page test (best effort: without root the
## test skips on a laptop; CI runs as root, and there a missing browser fails the test).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "note: could not install chromium; the browser test will skip (fail under CI=true)"; \
	fi

## Debian's promtool (package `prometheus`) for the alert rule tests (best effort, as `browser`:
## without root the tests skip on a laptop; under CI=true a missing promtool fails them).
promtool:
	@if ! command -v promtool >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) \
		|| echo "note: could not install promtool; the monitoring tests will skip (fail under CI=true)"; \
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

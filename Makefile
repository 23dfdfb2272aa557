# Two commands do all set-up: `make demo` (train and sample on the built-in corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here so a CPU-only machine installs the CPU wheel it has on disk; the project
# itself accepts torch>=2.4. Override for your own machine: `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# Where an offline machine keeps the tokenizer file (copied into .cache/tiktoken when present).
SHARED_TIKTOKEN ?= ../shared/tiktoken_cache

# Each demo run trains into a new directory, so a re-run never replaces an earlier one.
ifndef DEMO_OUT
DEMO_OUT := out/small-$(shell date +%Y%m%d-%H%M%S)
endif

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

# Prepare the built-in corpus once (meta.json is written last, so its absence means "not done"),
# train configs/small.py, plot the losses, print three samples.
demo: setup
	if [ ! -f data/shakespeare/meta.json ]; then \
		$(PY) prepare_data.py --dataset shakespeare --out data/shakespeare --overwrite; fi
	$(PY) train.py configs/small.py --out_dir=$(DEMO_OUT) --plot=true
	$(PY) sample.py --checkpoint $(DEMO_OUT) --prompt "ROMEO:" --num_samples 3 --max_new_tokens 100 \
		--temperature 0.8 --top_k 100 --seed 1
	@echo "run directory: $(DEMO_OUT) (loss curve: $(DEMO_OUT)/loss.png)"

bench: setup
	$(PY) bench.py

clean-venv:
	rm -rf $(VENV)

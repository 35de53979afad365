# `make chat` and `make test` each set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only machine an unpinned torch resolves to a multi-GB CUDA build; pin it first.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup chat serve test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,serve]"
	$(PY) -m offload.prebuild_kernels
	touch $@

chat: setup
	$(VENV)/bin/offload chat $(ARGS)

serve: setup
	$(VENV)/bin/offload serve $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

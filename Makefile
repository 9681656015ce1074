# Two entry points for a fresh clone: `make train` and `make test`. Both install first into .venv.
# torch==2.13.0 is pinned first so that a CPU-only machine with the local CPU wheel does not pull a
# multi-GB CUDA build; on a GPU machine the same pin takes PyPI's CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/installed

train: $(VENV)/installed
	$(PY) -m dtcollie.train --config train_configs/debug.toml

test: $(VENV)/installed
	$(PY) -m pytest -q --durations=20

.PHONY: install train test

# Two set-up commands: `make demo` (install + train on built-in synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) make_demo_data.py --out inputs/demo --n 120 --size 64
	@echo "train.py is not there yet: the demo stops after generating inputs/demo"

test: install
	$(PY) -m pytest -q tests

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
	$(PY) train.py --dataset demo --arch UNet --input_w 64 --input_h 64 --epochs 10 -b 8 \
		--optimizer Adam --lr 1e-3 --num_workers 0 --name demo --overwrite
	$(PY) val.py --name demo --overlay
	@echo "Demo done: log.csv and curves.png in models/demo/; masks, overlays and metrics.csv in outputs/demo/"

test: install
	$(PY) -m pytest -q -n auto --dist worksteal tests

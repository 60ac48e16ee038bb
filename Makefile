# Two commands: `make demo` and `make test`. Both set up .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): pip install -e '.[test]' (a few minutes the first time, mostly downloads)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sae_jax.demo demo
	$(VENV)/bin/sae-jax train --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf runs/demo demo

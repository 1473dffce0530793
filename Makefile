# `make demo`: chat with the embedded default model.  `make test`: the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench claims clean

$(VENV)/.runtime: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

$(VENV)/.dev: $(VENV)/.test requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m core.generate --model smollm2

test: $(VENV)/.test
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_train.py

claims: $(VENV)/.dev
	$(PY) -m train.claims.zero_init
	$(PY) -m train.claims.layers
	$(PY) -m train.claims.vs_lora

clean:
	rm -rf $(VENV)

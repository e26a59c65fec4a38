# Two entry points for a fresh machine (see README): `make up` and `make test`.
# Everything installs into .venv from requirements.lock (exact versions).

VENV   := .venv
BIN    := $(VENV)/bin
PYTHON ?= python3
UV_VERSION := 0.13.9

.PHONY: install system-packages up test lock clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

# Debian packages the tests drive as real parts: Prometheus and promtool.
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Debian package prometheus (for prometheus and promtool)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || { \
	  echo "error: could not install prometheus; run: sudo apt-get install prometheus" >&2; exit 1; }

up: install
	$(BIN)/mlops up

# Two pytest sessions: tests/in_process imports MLServer itself, which cannot share a
# process with tritonclient.grpc (both register the `inference` protobuf package).
test: install system-packages
	$(BIN)/python -m pytest -q tests --ignore=tests/in_process
	$(BIN)/python -m pytest -q tests/in_process

# Regenerate requirements.lock after changing dependencies in pyproject.toml.
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --no-header -o requirements.lock

clean:
	rm -rf $(VENV) .mlops

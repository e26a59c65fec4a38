# Two entry points for a fresh machine (see README): `make up` and `make test`.
# Everything installs into .venv from requirements.lock (exact versions).

VENV   := .venv
BIN    := $(VENV)/bin
PYTHON ?= python3
UV_VERSION := 0.13.9

.PHONY: install up test lock sync-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

up: install
	$(BIN)/mlops up

# Two pytest sessions: tests/in_process imports MLServer itself, which cannot share a
# process with tritonclient.grpc (both register the `inference` protobuf package).
test: install
	$(BIN)/python -m pytest -q tests --ignore=tests/in_process
	$(BIN)/python -m pytest -q tests/in_process

# Regenerate requirements.lock after changing dependencies in pyproject.toml.
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --no-header -o requirements.lock

clean:
	rm -rf $(VENV) .mlops

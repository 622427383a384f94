# TrustMesh: every target bootstraps .venv itself from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin

# Debian packages the test suite and benchmarks drive as real components.
DEB_PACKAGES := iptables iproute2 prometheus prometheus-alertmanager tshark golang-cfssl \
                haproxy wrk nghttp2-client curl openssl gcc libc6-dev

.PHONY: demo test lint bench protos deb clean help

help:
	@echo "make demo   run the TrustMesh demo (embedded mode, no Kubernetes)"
	@echo "make test   install what the tests need, lint, type-check and run the whole suite"
	@echo "make lint   ruff + mypy only"
	@echo "make bench  run the side-by-side benchmarks under benchmarks/"

$(VENV)/.stamp: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: $(VENV)/.stamp
	$(PY) -m protos.build

demo: protos
	$(BIN)/trustmesh demo --duration $${DEMO_SECONDS:-20}

deb:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping apt-get; tests needing $(DEB_PACKAGES) will skip if absent"; fi

lint: protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: deb lint
	$(BIN)/promtool check rules alerts/rules/*.yml 2>/dev/null || promtool check rules alerts/rules/*.yml
	cd alerts/rules && promtool test rules tests/*.yml
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: deb protos
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi protos/lite_schema.py

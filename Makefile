# Entry points for people and CI. `make test` must work on a clean clone, as root, with no stdin.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

# Debian's interpreter on purpose: the hook ships as a .deb against Debian's python3, and the
# pyenv python3 that may come first on PATH is not what the runtimes will find.
PYTHON := /usr/bin/python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
PYTEST := $(VENV)/bin/pytest
PYTEST_ARGS ?=

# Runtimes, network tools and clients the e2e tests and the demo drive, plus what
# `pip install python-prctl` needs to compile (libcap-dev, python3-dev, gcc) and Debian's own
# hook dependencies (one e2e test runs the hook against them).
APT_PACKAGES := crun runc busybox-static podman slirp4netns passt rootlesskit uidmap iperf3 \
	socat curl ncat iproute2 python3-venv python3-dev libcap-dev gcc \
	python3-pyroute2 python3-jsonschema python3-prctl

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: deps venv test test-unit test-e2e demo clean

# One dpkg-query for the whole list keeps this instant when everything is there.
deps:
	@installed=$$(dpkg-query -W -f='$${Package} $${db:Status-Abbrev}\n' $(APT_PACKAGES) 2>/dev/null \
		| awk '$$2 == "ii" {print $$1}' || true); \
	missing=""; \
	for p in $(APT_PACKAGES); do \
		grep -qx "$$p" <<<"$$installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing </dev/null; \
	fi

venv: $(VENV_STAMP)

# The stamp makes a second `make venv` a no-op; it is redone when the package metadata changes.
# A .venv made by another interpreter (e.g. pyenv's) is thrown away rather than reused.
$(VENV_STAMP): setup.cfg pyproject.toml | deps
	@if [ -x $(VENV)/bin/python ] && \
	    ! $(VENV)/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then \
		echo "venv: $(VENV) was not made by $(PYTHON); recreating"; rm -rf $(VENV); \
	fi
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --use-pep517 -e '.[test]' </dev/null
	@touch $@

test: deps venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/

test-unit: venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/unit

test-e2e: deps venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/e2e

demo: deps venv
	bash examples/demo.sh

clean:
	rm -rf $(VENV) build dist hook/*.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

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
# The dialer's loop in C (hook/native/portfwd-dialer.c; dialer_process.py execs it from
# sys.prefix/libexec/oci-portfwd-hook/, so the venv gets it where the packages put it in /usr).
NATIVE_DIALER_SRC := hook/native/portfwd-dialer.c
NATIVE_DIALER := $(VENV)/libexec/oci-portfwd-hook/portfwd-dialer
# The supervisor's quiet life in C (hook/native/portfwd-keeper.c; supervisor.py execs it from
# the same directory once its core serves).
KEEPER_SRC := hook/native/portfwd-keeper.c
KEEPER := $(VENV)/libexec/oci-portfwd-hook/portfwd-keeper
# The relay threads in C (hook/native/portfwd_relay.c), an extension of CPython's stable ABI
# (3.11 on: one file for every interpreter the package supports), loaded by native_relay.py
# from the same directory.
RELAY_SRC := hook/native/portfwd_relay.c hook/native/udp_batch.c
RELAY := $(VENV)/libexec/oci-portfwd-hook/portfwd_relay.abi3.so
RELAY_CFLAGS := -shared -fPIC -pthread -DPy_LIMITED_API=0x030b0000
NATIVE_CFLAGS := -O2 -Wall -Wextra -Werror

# Runtimes, network tools and clients the e2e tests and the demo drive, plus what
# `pip install python-prctl` needs to compile (libcap-dev, python3-dev, gcc) and Debian's own
# hook dependencies (one e2e test runs the hook against them). haproxy is the PROXY protocol
# parser the e2e tests run inside a container (its service is not started: see deps).
# gcc and libc6-dev also build the native dialer (hook/native/portfwd-dialer.c), python3-dev the
# relay threads' extension.
# docker.io brings dockerd 20.10, containerd 1.6 and ctr for oci-portfwd-runtime's tests;
# python3-seccomp is libseccomp's binding (the venv gets pyseccomp from PyPI instead).
APT_PACKAGES := crun runc busybox-static podman slirp4netns passt rootlesskit uidmap iperf3 \
	socat curl ncat iproute2 python3-venv python3-dev libcap-dev gcc libc6-dev \
	python3-pyroute2 python3-jsonschema python3-prctl haproxy docker.io python3-seccomp

# What `make deb` and `make rpm` build with (rpm is Debian's rpmbuild; gcc and libc6-dev for
# the native dialer), and the checkers the packaging tests run on their output.
PKG_APT_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-dev gcc libc6-dev lintian rpm rpmlint

# What `make bench` adds (bench/README.md): HTTP load generators. The forwarders, iperf3, crun
# and gcc (for bench/httpd.c) are in APT_PACKAGES.
BENCH_APT_PACKAGES := wrk apache2-utils
# e.g. make bench BENCH_ARGS='--rounds 1 --only ours-builtin,rootlesskit-builtin,loopback'
BENCH_ARGS ?=
# bench/container_cost.py (issue 12: start, delete and PSS per container), e.g. COST_ARGS='--runs 20'
COST_ARGS ?=
# bench/source_cost.py (issue 15: source_address client ÷ loopback, side by side), e.g. SOURCE_ARGS='--blocks 10'
SOURCE_ARGS ?=

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' hook/oci_portfwd/__init__.py)
# Package builds see Debian's tools only: a pyenv python3 first on PATH would be picked up by
# pybuild and rpmbuild and build against the wrong interpreter.
BUILD_ENV := env PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
# The source tree as git sees it (tracked and new files, not ignored ones: no .venv, dist,
# build, caches), or, outside a git checkout, everything but those.
SOURCE_FILES := { if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z -co --exclude-standard; \
	else \
		find . \( -name .git -o -name .venv -o -name dist -o -name build -o -name '.*_cache' \
			-o -name .hypothesis -o -name __pycache__ -o -name '*.egg-info' \) -prune \
			-o -type f -print0; \
	fi; }

.PHONY: deps pkg-deps bench-deps bench venv native-dialer validators lint test test-unit test-e2e test-packaging deb rpm demo clean

deps: PKGS = $(APT_PACKAGES)
pkg-deps: PKGS = $(PKG_APT_PACKAGES)
bench-deps: PKGS = $(BENCH_APT_PACKAGES)

# One dpkg-query for the whole list keeps this instant when everything is there.
# Nothing installed here may start a service on the host (haproxy's postinst would start one
# through invoke-rc.d): without a policy-rc.d of the admin's, one that denies every start is in
# place for the install and removed afterwards.
POLICY_RC_D := /usr/sbin/policy-rc.d
deps pkg-deps bench-deps:
	@installed=$$(dpkg-query -W -f='$${Package} $${db:Status-Abbrev}\n' $(PKGS) 2>/dev/null \
		| awk '$$2 == "ii" {print $$1}' || true); \
	missing=""; \
	for p in $(PKGS); do \
		grep -qx "$$p" <<<"$$installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "$@: installing$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null; \
		if [ ! -e $(POLICY_RC_D) ]; then \
			trap '$(SUDO) rm -f $(POLICY_RC_D)' EXIT; \
			printf '#!/bin/sh\n# make deps: start no service while installing\nexit 101\n' \
				| $(SUDO) tee $(POLICY_RC_D) >/dev/null; \
			$(SUDO) chmod 755 $(POLICY_RC_D); \
		fi; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing </dev/null; \
	fi

venv: $(VENV_STAMP) $(NATIVE_DIALER) $(KEEPER) $(RELAY)

native-dialer: $(NATIVE_DIALER) $(KEEPER) $(RELAY)

$(RELAY): $(RELAY_SRC) hook/native/udp_batch.h | $(VENV_STAMP)
	@mkdir -p $(@D)
	$(CC) $(NATIVE_CFLAGS) $(RELAY_CFLAGS) \
		-I$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])') -o $@ $(RELAY_SRC)

$(KEEPER): $(KEEPER_SRC) | $(VENV_STAMP)
	@mkdir -p $(@D)
	$(CC) $(NATIVE_CFLAGS) -o $@ $<

# Execute-only (0111), as the packages install it: exec'd from a file it cannot read, the
# dialer stays out of reach of the container's user namespace (see the program's header).
$(NATIVE_DIALER): $(NATIVE_DIALER_SRC) | $(VENV_STAMP)
	@mkdir -p $(@D)
	$(CC) $(NATIVE_CFLAGS) -o $@ $<
	chmod 0111 $@

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

# hook/oci_portfwd/validators.py is generated from schemas/*.json (fastjsonschema, in the
# venv); a unit test fails while it is stale.
validators: venv
	$(VENV)/bin/python schemas/compile_validators.py

# ruff over everything, mypy over the hook (conventions.md); pinned in setup.cfg's [test].
lint: venv
	$(VENV)/bin/ruff check hook tests bench schemas
	$(VENV)/bin/mypy hook/oci_portfwd

test: deps pkg-deps venv lint
	$(PYTEST) -ra $(PYTEST_ARGS) tests/

test-unit: venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/unit

test-e2e: deps venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/e2e

test-packaging: deps pkg-deps venv
	$(PYTEST) -ra $(PYTEST_ARGS) tests/packaging

# Where `make deb` / `make rpm` work and put the packages (the packaging tests pass their own
# temporary directories).
PKG_BUILD_DIR ?= build
DIST_DIR ?= dist
DEB_BUILD = $(abspath $(PKG_BUILD_DIR))/deb
RPM_BUILD = $(abspath $(PKG_BUILD_DIR))/rpm
DIST = $(abspath $(DIST_DIR))

# dist/oci-portfwd-hook_VERSION_ARCH.deb, built with dpkg-buildpackage in a copy of the tree
# (build/deb/src, packaging/debian as its debian/): the source tree stays clean. ARCH is the
# build machine's (the native dialer is compiled).
DEB_ARCH = $(shell dpkg --print-architecture)
RPM_ARCH = $(shell rpm --eval '%{_arch}')
deb: pkg-deps
	@v=$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version); \
	[ "$$v" = "$(VERSION)" ] || { echo "deb: packaging/debian/changelog is at $$v," \
		"__version__ is $(VERSION): add a changelog entry for $(VERSION)" >&2; exit 1; }
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src $(DIST)
	$(SOURCE_FILES) | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(DEB_BUILD)/src
	cp -a packaging/debian $(DEB_BUILD)/src/debian
	cd $(DEB_BUILD)/src && $(BUILD_ENV) DEB_BUILD_OPTIONS=nocheck dpkg-buildpackage -b -us -uc </dev/null
	cp $(DEB_BUILD)/oci-portfwd-hook_$(VERSION)_$(DEB_ARCH).deb $(DIST)/
	@echo "deb: $(DIST)/oci-portfwd-hook_$(VERSION)_$(DEB_ARCH).deb"

# dist/oci-portfwd-hook-VERSION-1.ARCH.rpm with Debian's rpmbuild. --nodeps: the spec's
# BuildRequires are Fedora packages, absent here (see the spec's header). Debian's brp-compress
# is a bash script under #!/bin/sh (dash fails on `read -d`): run it with bash, so that the man
# pages are gzipped as rpmbuild does on Fedora.
rpm: pkg-deps
	@v=$$(sed -n 's/^Version:[[:space:]]*//p' packaging/rpm/oci-portfwd-hook.spec); \
	[ "$$v" = "$(VERSION)" ] || { echo "rpm: packaging/rpm/oci-portfwd-hook.spec is at $$v," \
		"__version__ is $(VERSION): update Version and %changelog" >&2; exit 1; }
	rm -rf $(RPM_BUILD) && mkdir -p $(RPM_BUILD)/SOURCES $(RPM_BUILD)/src/oci-portfwd-hook-$(VERSION) $(DIST)
	$(SOURCE_FILES) | tar --null -T - --ignore-failed-read -cf - \
		| tar -xf - -C $(RPM_BUILD)/src/oci-portfwd-hook-$(VERSION)
	tar -C $(RPM_BUILD)/src -czf $(RPM_BUILD)/SOURCES/oci-portfwd-hook-$(VERSION).tar.gz \
		oci-portfwd-hook-$(VERSION)
	$(BUILD_ENV) rpmbuild -bb --nodeps --define "_topdir $(RPM_BUILD)" \
		--define '__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}' \
		packaging/rpm/oci-portfwd-hook.spec </dev/null
	cp $(RPM_BUILD)/RPMS/$(RPM_ARCH)/oci-portfwd-hook-$(VERSION)-*.$(RPM_ARCH).rpm $(DIST)/
	@echo "rpm: $$(ls $(DIST)/oci-portfwd-hook-$(VERSION)-*.$(RPM_ARCH).rpm)"

# The performance comparison with rootlesskit, pasta, slirp4netns, socat and direct loopback
# (~15 min, root): writes bench/RESULTS.md and bench/results.json.
bench: deps bench-deps venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/container_cost.py $(COST_ARGS)
	$(VENV)/bin/python bench/source_cost.py $(SOURCE_ARGS)

demo: deps venv
	bash examples/demo.sh

clean:
	rm -rf $(VENV) build dist hook/*.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

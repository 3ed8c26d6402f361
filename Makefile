# qubes-socksvc: one install path for both packages, and the developer entry points.
#   make demo    set up, then run the bundled example end to end (root, Debian 12)
#   make check   set up, then run the whole test suite (what .ci/run calls)
#   make bench   set up, then print the benchmark table
#   make install DESTDIR=... PREFIX=/usr    what debian/rules and the RPM spec call

PYTHON     ?= /usr/bin/python3
PREFIX     ?= /usr
DESTDIR    ?=
SYSCONFDIR ?= /etc
VERSION    := $(shell cat version)
VENV       := .venv
VPY        := $(VENV)/bin/python

# Debian packages the runtime needs (the .deb's Depends) ...
RUNTIME_DEBS := python3 python3-venv python3-systemd python3-jinja2 python3-yaml systemd
# ... and what the tests and package builds need on top.
TEST_DEBS := $(RUNTIME_DEBS) systemd-container dbus-user-session debhelper dh-python python3-all \
	python3-setuptools python3-pip dpkg-dev devscripts lintian rpm socat procps util-linux passwd git make

.PHONY: all setup setup-test check test lint demo bench install install-python install-data deb rpm clean

all:
	@echo "targets: demo check bench install deb rpm clean"

# --- set-up: installs what it needs itself ------------------------------------
$(VENV)/.stamp-runtime:
	apt-get update -qq || true
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RUNTIME_DEBS)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-runtime requirements-test.txt
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_DEBS)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

setup: $(VENV)/.stamp-runtime
setup-test: $(VENV)/.stamp-test

# --- the two README commands ---------------------------------------------------
demo: setup
	PYTHON=$(VPY) ./tools/demo.sh

check: setup-test
	$(VPY) -m pytest -ra $(PYTEST_ARGS)

test: check

bench: setup-test
	$(VPY) -m bench

# --- install: both packages come through here ----------------------------------
install: install-python install-data

install-python:
	$(PYTHON) setup.py -q install --root=$(or $(DESTDIR),/) --prefix=$(PREFIX) --optimize=1

install-data:
	install -d $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates
	install -m 0644 templates/*.j2 $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates/
	install -d $(DESTDIR)$(SYSCONFDIR)
	install -m 0644 etc/qubes-socksvc.yaml $(DESTDIR)$(SYSCONFDIR)/qubes-socksvc.yaml
	install -d $(DESTDIR)$(PREFIX)/share/doc/qubes-socksvc/examples
	install -m 0644 examples/qubes-socksvc.yaml $(DESTDIR)$(PREFIX)/share/doc/qubes-socksvc/examples/

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache pkgs rpmbuild

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
TEST_DEBS := $(RUNTIME_DEBS) python3-uvloop systemd-container dbus-user-session debhelper dh-python python3-all \
	python3-setuptools python3-pip build-essential dpkg-dev devscripts lintian rpm socat procps \
	util-linux passwd git make

.PHONY: all setup setup-test check check-here test demo demo-here bench bench-here install install-python install-data deb rpm clean

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
# The daemon refuses root: these run it as nobody, so tools/reachable.sh runs them
# in a world-readable copy when this checkout is not readable by nobody.
demo check bench:
	./tools/reachable.sh $@

demo-here: setup
	PYTHON=$(VPY) ./tools/demo.sh

check-here: setup-test
	$(VPY) -m pytest -ra $(PYTEST_ARGS)

test: check

bench-here: setup-test
	$(VPY) -m bench

# --- install: both packages come through here ----------------------------------
# debian/rules installs the Python package with pybuild and the rest with
# install-data; the RPM spec calls "make install".  PYTHON_SITELIB defaults to
# the distribution's own directory for PREFIX (Debian: /usr/lib/python3/dist-packages).
PYTHON_SITELIB ?= $(shell $(PYTHON) -c 'import sysconfig as s; \
	n = "deb_system" if "deb_system" in s.get_scheme_names() else "posix_prefix"; \
	print(s.get_path("purelib", n, vars={"base": "$(PREFIX)", "platbase": "$(PREFIX)"}))')
DOCDIR ?= $(PREFIX)/share/doc/qubes-socksvc

install: install-python install-data

install-python:
	$(PYTHON) setup.py -q install --root=$(or $(DESTDIR),/) --prefix=$(PREFIX) \
		--install-lib=$(PYTHON_SITELIB) --install-scripts=$(PREFIX)/bin --optimize=1

install-data:
	install -d $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates
	install -m 0644 templates/*.j2 $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates/
	install -d $(DESTDIR)$(SYSCONFDIR)
	install -m 0644 etc/qubes-socksvc.yaml $(DESTDIR)$(SYSCONFDIR)/qubes-socksvc.yaml
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 examples/qubes-socksvc.yaml $(DESTDIR)$(DOCDIR)/examples/
	$(if $(wildcard README.md),install -m 0644 README.md $(DESTDIR)$(DOCDIR)/)

# --- packages, built from a copy of the working tree (so the tree stays clean) --
#   make deb   -> $(PKGDIR)/qubes-socksvc_*.deb (+ .changes, .buildinfo), lintian-checked
#   make rpm   -> $(RPMDIR)/RPMS/noarch/qubes-socksvc-*.rpm
PKGDIR ?= pkgs
RPMDIR ?= rpmbuild
DEB_VERSION = $(shell dpkg-parsechangelog -S Version)
SOURCE_EXCLUDES := --exclude-vcs --exclude=./.venv --exclude=./pkgs --exclude=./rpmbuild --exclude=./build \
	--exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.pytest_cache \
	--exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.hypothesis
# The distribution's tools only: pybuild runs "python3.X" from PATH.
SYSTEM_PATH := /usr/sbin:/usr/bin:/sbin:/bin
# rpmbuild checks BuildRequires against the RPM database: empty on Debian.
RPM_NODEPS = $(shell rpm -q rpm >/dev/null 2>&1 || echo --nodeps)

deb:
	rm -rf $(PKGDIR)/build
	mkdir -p $(PKGDIR)/build/qubes-socksvc-$(VERSION)
	tar -c $(SOURCE_EXCLUDES) . | tar -x -C $(PKGDIR)/build/qubes-socksvc-$(VERSION)
	cd $(PKGDIR)/build/qubes-socksvc-$(VERSION) && PATH=$(SYSTEM_PATH) dpkg-buildpackage -us -uc -b
	mv $(PKGDIR)/build/qubes-socksvc_$(DEB_VERSION)_* $(PKGDIR)/
	rm -rf $(PKGDIR)/build
	lintian --allow-root --fail-on error $(PKGDIR)/qubes-socksvc_$(DEB_VERSION)_*.changes

rpm:
	rm -rf $(RPMDIR)
	mkdir -p $(RPMDIR)/SOURCES $(RPMDIR)/SPECS
	tar -cz $(SOURCE_EXCLUDES) --transform 's,^\.,qubes-socksvc-$(VERSION),' \
		-f $(RPMDIR)/SOURCES/qubes-socksvc-$(VERSION).tar.gz .
	sed 's/@VERSION@/$(VERSION)/g' rpm_spec/qubes-socksvc.spec.in > $(RPMDIR)/SPECS/qubes-socksvc.spec
	rpmbuild --define "_topdir $(abspath $(RPMDIR))" $(RPM_NODEPS) -bb $(RPMDIR)/SPECS/qubes-socksvc.spec

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache pkgs rpmbuild

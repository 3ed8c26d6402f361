# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
# qubes-socksvc: one install path for both packages, and the developer entry points.
#   make demo    set up, then run the bundled example end to end (root, Debian 12)
#   make check   set up, then run the whole test suite (what .ci/run calls)
#   make bench   set up, then print the benchmark table
#   make mutation  set up, then mutation-test the trust boundary (tools/mutate.py; minutes; not in check)
#   make install DESTDIR=... PREFIX=/usr    what debian/rules and the RPM spec call
#   make deb / make rpm   the packages (lintian-checked .deb; .rpm with Debian's rpmbuild or Fedora's)
#   make trixie  the proof on Debian 13: debootstrap, install the .deb, run the suite (downloads; not in check)

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
	python3-setuptools python3-pip pybuild-plugin-pyproject python3-build python3-installer python3-wheel \
	python3-docutils build-essential dpkg-dev devscripts lintian rpm rpmlint socat procps util-linux passwd \
	man-db e2fsprogs git make
# Every apt-get waits for another apt (unattended-upgrades, a parallel job) instead of failing at once.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600

.PHONY: all setup setup-test check check-here test demo demo-here bench bench-here install install-python \
	install-data wheel man check-built deb rpm trixie clean mutation

all:
	@echo "targets: demo check bench install deb rpm man trixie clean"

# --- set-up: installs what it needs itself ------------------------------------
$(VENV)/.stamp-runtime:
	$(APT_GET) update -qq || true
	$(APT_GET) install -y -qq --no-install-recommends $(RUNTIME_DEBS)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	touch $@

# Also after a Makefile change: TEST_DEBS may have grown (apt-get skips what is installed).
$(VENV)/.stamp-test: $(VENV)/.stamp-runtime requirements-test.txt Makefile
	$(APT_GET) install -y -qq --no-install-recommends $(TEST_DEBS)
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

# Each mutant runs in its own world-readable copy under /tmp (the daemon runs as nobody):
# no reachable.sh needed.  The default is the whole run the README reports (each mutant's
# tests up to 30 s of their time, three at once); MUTATION_ARGS="--only request.py" for one
# module and all of its tests.
MUTATION_ARGS ?= --budget 30 --jobs 3
mutation: setup-test
	$(VPY) tools/mutate.py $(MUTATION_ARGS)

# Debian 13 in a scratch chroot (tools/trixie.sh); needs root and a mirror.
trixie:
	command -v debootstrap >/dev/null || $(APT_GET) install -y -qq --no-install-recommends debootstrap
	./tools/trixie.sh

# --- install: both packages come through here ----------------------------------
# debian/rules installs the Python package with pybuild (its pyproject plugin)
# and the rest with install-data; the RPM spec uses Fedora's %pyproject_* macros
# and install-data, or, where rpmbuild lacks those macros (Debian's), "make
# install".  install-python builds a wheel with the PEP 517 backend declared in
# pyproject.toml (no setup.py) and installs it with explicit paths:
# PYTHON_SITELIB defaults to the distribution's own directory for PREFIX
# (Debian: /usr/lib/python3/dist-packages).
PYTHON_SITELIB ?= $(shell $(PYTHON) -c 'import sysconfig as s; \
	n = "deb_system" if "deb_system" in s.get_scheme_names() else "posix_prefix"; \
	print(s.get_path("purelib", n, vars={"base": "$(PREFIX)", "platbase": "$(PREFIX)"}))')
DOCDIR ?= $(PREFIX)/share/doc/qubes-socksvc
MANDIR ?= $(PREFIX)/share/man
WHEELDIR ?= build/wheel
MANBUILD ?= build/man

install: install-python install-data

WHEEL := $(WHEELDIR)/qubes_socksvc-$(VERSION)-py3-none-any.whl
wheel: $(WHEEL)
$(WHEEL): setup.cfg pyproject.toml version LICENSE README.md $(shell find qubes_socksvc -type f -not -path '*/__pycache__/*')
	rm -rf $(WHEELDIR)
	$(PYTHON) -m build --wheel --no-isolation --skip-dependency-check --outdir $(WHEELDIR)

install-python: $(WHEEL)
	$(PYTHON) tools/install-wheel.py --destdir=$(or $(DESTDIR),/) --sitelib=$(PYTHON_SITELIB) \
		--bindir=$(PREFIX)/bin --prefix=$(PREFIX) $(WHEEL)

# qubes-socksvc(1) from the argparse parser itself, qubes-socksvc.yaml(5) from man/*.rst.
man:
	$(PYTHON) man/mkman.py $(MANBUILD)

install-data: man
	install -d $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates
	install -m 0644 templates/*.j2 $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates/
	install -d $(DESTDIR)$(SYSCONFDIR)
	install -m 0644 etc/qubes-socksvc.yaml $(DESTDIR)$(SYSCONFDIR)/qubes-socksvc.yaml
	install -d $(DESTDIR)$(SYSCONFDIR)/qubes/post-install.d
	install -m 0755 etc/post-install.d/20-qubes-socksvc.sh $(DESTDIR)$(SYSCONFDIR)/qubes/post-install.d/
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 examples/qubes-socksvc.yaml $(DESTDIR)$(DOCDIR)/examples/
	$(if $(wildcard README.md),install -m 0644 README.md $(DESTDIR)$(DOCDIR)/)
	install -m 0644 NEWS SECURITY.md $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5
	install -m 0644 $(MANBUILD)/qubes-socksvc.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(MANBUILD)/qubes-socksvc.yaml.5 $(DESTDIR)$(MANDIR)/man5/

# The build-time check both packages run (debian/rules' dh_auto_test, the
# spec's %check): the built modules and templates, copied into a scratch
# directory, validate the example manifest and render it into a scratch tree.
BUILT_SITELIB ?= $(DESTDIR)$(PYTHON_SITELIB)
BUILT_TEMPLATES ?= $(DESTDIR)$(PREFIX)/share/qubes-socksvc/templates
EXAMPLE := $(CURDIR)/examples/qubes-socksvc.yaml
check-built:
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && mkdir "$$scratch/lib" && \
	cp -r $(BUILT_SITELIB)/qubes_socksvc $(BUILT_TEMPLATES) "$$scratch/lib/" && \
	cd "$$scratch" && export PYTHONPATH="$$scratch/lib" && \
	$(PYTHON) -m qubes_socksvc check -c $(EXAMPLE) && \
	$(PYTHON) -m qubes_socksvc apply -c $(EXAMPLE) --root "$$scratch/root" && \
	grep -q '^ExecStart=.* -m qubes_socksvc serve example ' root/etc/systemd/user/qubes-socksvc-example.service && \
	test -L root/etc/qubes-rpc/example.Echo

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
# Debian's brp-compress needs bash (read -d) but says #!/bin/sh: run it with bash.
RPM_ON_DEBIAN = $(shell rpm -q rpm >/dev/null 2>&1 || echo yes)
RPM_DEBIAN_ARGS = $(if $(RPM_ON_DEBIAN),--nodeps --define '__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}')

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
	rpmbuild --define "_topdir $(abspath $(RPMDIR))" $(RPM_DEBIAN_ARGS) -bb $(RPMDIR)/SPECS/qubes-socksvc.spec

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache pkgs rpmbuild

"""The .deb and the .rpm, built by ``make deb rpm``: contents, metadata, scriptlets, lintian."""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.packages import Built, build, missing_tools

pytestmark = pytest.mark.slow

VERSION = (REPO / "version").read_text().strip()
MODULES = sorted(p.name for p in (REPO / "qubes_socksvc").glob("*.py"))
TEMPLATES = sorted(p.name for p in (REPO / "templates").glob("*.j2"))
DEB_SITELIB = "/usr/lib/python3/dist-packages"
RUNTIME_DEPENDS = ("python3-jinja2", "python3-yaml", "python3-systemd", "systemd")
#: Lintian warnings we accept, each explained in docs/packaging-and-quickstart.md.
ACCEPTED_LINTIAN = {"initial-upload-closes-no-bugs", "no-manual-page"}


@pytest.fixture(scope="session")
def packages() -> Built:
    if missing := missing_tools():
        pytest.skip(f"package tools missing: {', '.join(missing)} ('make setup-test' installs them)")
    return build()


def out(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def deb_files(deb: Path) -> set[str]:
    """Regular files and symlinks in the .deb, as absolute paths."""
    with tempfile.TemporaryFile() as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, check=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            return {m.name.removeprefix(".") for m in tar.getmembers() if not m.isdir()}


def deb_member_text(deb: Path, path: str) -> str:
    with tempfile.TemporaryFile() as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, check=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            member = tar.extractfile("." + path)
            assert member is not None
            return member.read().decode()


def deb_control_file(deb: Path, name: str) -> str:
    return out("dpkg-deb", "--info", str(deb), name)


# --- versions -------------------------------------------------------------------


def test_versions_come_from_the_version_file(packages: Built) -> None:
    deb_version = out("dpkg-deb", "--field", str(packages.deb), "Version").strip()
    assert deb_version.split("-")[0] == VERSION, "debian/changelog disagrees with the version file"
    rpm_version = out("rpm", "-qp", "--qf", "%{VERSION}", str(packages.rpm)).strip()
    assert rpm_version == VERSION
    assert "@VERSION@" in (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()


# --- the .deb ----------------------------------------------------------------------


def test_deb_control_fields(packages: Built) -> None:
    fields = out("dpkg-deb", "--field", str(packages.deb))
    assert re.search(r"^Section: admin$", fields, re.M)
    assert re.search(r"^Architecture: all$", fields, re.M)
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends is not None
    names = {d.strip().split()[0] for d in depends.group(1).split(",")}
    assert set(RUNTIME_DEPENDS) <= names, names
    assert any(n.startswith("python3") and n not in RUNTIME_DEPENDS for n in names), "no ${python3:Depends}"


def test_deb_ships_runtime_cli_templates_and_an_inactive_conffile(packages: Built) -> None:
    files = deb_files(packages.deb)
    assert "/usr/bin/qubes-socksvc" in files
    for module in MODULES:
        assert f"{DEB_SITELIB}/qubes_socksvc/{module}" in files
    assert f"{DEB_SITELIB}/qubes_socksvc/py.typed" in files
    for template in TEMPLATES:
        assert f"/usr/share/qubes-socksvc/templates/{template}" in files
    assert "/etc/qubes-socksvc.yaml" in files
    assert "/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml" in files
    assert "/usr/share/doc/qubes-socksvc/copyright" in files
    if (REPO / "README.md").exists():
        assert "/usr/share/doc/qubes-socksvc/README.md" in files  # the conffile points at it
    assert not [f for f in files if f.startswith("/usr/local/")]
    assert deb_control_file(packages.deb, "conffiles").split() == ["/etc/qubes-socksvc.yaml"]
    script = deb_member_text(packages.deb, "/usr/bin/qubes-socksvc")
    assert script.startswith("#!/usr/bin/python3\n")


def test_shipped_manifest_is_valid_and_declares_nothing(packages: Built, tmp_path: Path) -> None:
    conffile = tmp_path / "qubes-socksvc.yaml"
    conffile.write_text(deb_member_text(packages.deb, "/etc/qubes-socksvc.yaml"))
    result = run_cli("check", "-c", str(conffile), check=True)
    assert "0 daemons, 0 services" in result.stdout
    example = tmp_path / "example.yaml"
    example.write_text(deb_member_text(packages.deb, "/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml"))
    run_cli("check", "-c", str(example), check=True)


def test_deb_maintainer_scripts(packages: Built) -> None:
    postinst = deb_control_file(packages.deb, "postinst")
    prerm = deb_control_file(packages.deb, "prerm")
    postrm = deb_control_file(packages.deb, "postrm")
    for script in (postinst, prerm, postrm):
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    # apply on configure for both manifests, and a failure is reported, not fatal
    assert 'qubes-socksvc apply -c "$manifest"' in postinst
    assert "/etc/qubes-socksvc.yaml /usr/local/etc/qubes-socksvc.yaml" in postinst
    assert "if ! qubes-socksvc apply" in postinst and "WARNING" in postinst
    assert "py3compile" in postinst  # dh_python3's snippet survived #DEBHELPER#
    # remove: take back the generated files; purge: forget the ownership record
    assert "remove)" in prerm and "qubes-socksvc apply" in prerm
    assert "purge)" in postrm and "/var/lib/qubes-socksvc" in postrm


def test_build_time_check_ran(packages: Built) -> None:
    """dh_auto_test validated and rendered the example with the freshly built modules."""
    assert "examples/qubes-socksvc.yaml: OK, 2 daemons" in packages.log
    assert re.search(r"^create +/etc/systemd/user/qubes-socksvc-example\.socket$", packages.log, re.M)


def test_lintian_reports_no_errors(packages: Built) -> None:
    tags = packages.lintian_tags
    assert not [t for t in tags if t.startswith("E:")], "\n".join(tags)
    warnings = {t.split()[2] for t in tags if t.startswith("W:")}
    assert warnings <= ACCEPTED_LINTIAN, f"new lintian warnings: {warnings - ACCEPTED_LINTIAN}"
    docs = "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")] if p.exists())
    for tag in warnings:
        assert tag in docs, f"lintian warning {tag} is not explained in the README"


# --- the .rpm ----------------------------------------------------------------------


def rpm_sitelib(files: set[str]) -> str:
    inits = [f for f in files if f.endswith("/qubes_socksvc/__init__.py")]
    assert len(inits) == 1, inits
    return inits[0].removesuffix("/qubes_socksvc/__init__.py")


def test_rpm_file_list(packages: Built) -> None:
    files = set(out("rpm", "-qlp", str(packages.rpm)).split())
    sitelib = rpm_sitelib(files)
    assert sitelib.startswith("/usr/lib")
    assert "/usr/bin/qubes-socksvc" in files
    for module in MODULES:
        assert f"{sitelib}/qubes_socksvc/{module}" in files
    for template in TEMPLATES:
        assert f"/usr/share/qubes-socksvc/templates/{template}" in files
    assert "/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml" in files
    assert any(re.fullmatch(rf"{sitelib}/qubes_socksvc-{re.escape(VERSION)}-py[0-9.]+\.egg-info", f) for f in files)
    flags = dict(line.rsplit(" ", 1) for line in out(
        "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(packages.rpm)).splitlines()
        if line.count(" ") == 1)
    assert set(flags["/etc/qubes-socksvc.yaml"]) >= {"c", "n"}, "the manifest must be %config(noreplace)"
    assert "d" in flags["/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml"]
    requires = out("rpm", "-qpR", str(packages.rpm)).split()
    for name in ("python3-jinja2", "python3-pyyaml", "python3-systemd", "systemd"):
        assert name in requires


def test_rpm_scriptlets(packages: Built) -> None:
    scripts = out("rpm", "-qp", "--scripts", str(packages.rpm))
    scriptlet = re.compile(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", re.M | re.S)
    sections = dict(scriptlet.findall(scripts))
    assert set(sections) == {"postinstall", "preuninstall", "postuninstall"}, scripts
    for body in sections.values():
        subprocess.run(["sh", "-n"], input=body, text=True, check=True)
    assert '/usr/bin/qubes-socksvc apply -c "$manifest"' in sections["postinstall"]
    assert "WARNING" in sections["postinstall"] and sections["postinstall"].rstrip().endswith("exit 0")
    assert '[ "$1" -eq 0 ]' in sections["preuninstall"] and "qubes-socksvc apply" in sections["preuninstall"]
    assert '[ "$1" -eq 0 ]' in sections["postuninstall"] and "/var/lib/qubes-socksvc" in sections["postuninstall"]


def test_deb_and_rpm_install_the_same_files(packages: Built) -> None:
    """One install path: apart from the Python directory and Debian's own docs, the payloads match."""
    rpm_all = set(out("rpm", "-qlp", str(packages.rpm)).split())
    rpm_dirs = {line.split()[-1] for line in out("rpm", "-qlvp", str(packages.rpm)).splitlines()
                if line.startswith("d")}
    sitelib = rpm_sitelib(rpm_all)

    def normal(path: str, lib: str) -> str:
        path = path.replace(lib, "SITELIB", 1)
        return re.sub(r"SITELIB/qubes_socksvc-[^/]*\.egg-info", "SITELIB/EGG-INFO", path)

    rpm_files = {normal(f, sitelib) for f in rpm_all - rpm_dirs}
    debian_only = {"/usr/share/doc/qubes-socksvc/copyright", "/usr/share/doc/qubes-socksvc/changelog.Debian.gz"}
    deb = {normal(f, DEB_SITELIB) for f in deb_files(packages.deb) - debian_only}
    # dh_python3 drops SOURCES.txt; Debian byte-compiles at install time, not in the package
    rpm_files = {f for f in rpm_files if not f.endswith("/SOURCES.txt") and "/__pycache__/" not in f}
    assert deb == rpm_files, f"only in .deb: {sorted(deb - rpm_files)}; only in .rpm: {sorted(rpm_files - deb)}"

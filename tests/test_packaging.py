# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The .deb and the .rpm, built by ``make deb rpm``: contents, metadata, scriptlets, lintian.

Also, without building anything: the licence (LICENSE, debian/copyright, the
spec, setup.cfg and an SPDX header in every source file) and .qubesbuilder.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.packages import Built, build, missing_tools

slow = pytest.mark.slow  # builds the packages

VERSION = (REPO / "version").read_text().strip()
MODULES = sorted(p.name for p in (REPO / "qubes_socksvc").glob("*.py"))
TEMPLATES = sorted(p.name for p in (REPO / "templates").glob("*.j2"))
DEB_SITELIB = "/usr/lib/python3/dist-packages"
RUNTIME_DEPENDS = ("python3-jinja2", "python3-yaml", "python3-systemd", "systemd")
#: Lintian warnings we accept, each explained in docs/packaging.md.
ACCEPTED_LINTIAN = {"initial-upload-closes-no-bugs"}
#: The documentation both packages ship, uncompressed (the Markdown files link to each other and to NEWS).
DOCS = ("README.md", "NEWS", "SECURITY.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))))
#: The hook qubes.PostInstall runs (qubes-core-agent-linux qubes-rpc/qubes.PostInstall: every executable
#: /etc/qubes/post-install.d/*.sh), which announces the applied services to dom0.
POST_INSTALL_HOOK = "/etc/qubes/post-install.d/20-qubes-socksvc.sh"
MAN_PAGES = ("/usr/share/man/man1/qubes-socksvc.1.gz", "/usr/share/man/man5/qubes-socksvc.yaml.5.gz")
SPDX = "SPDX-License-Identifier: GPL-2.0-or-later"


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


def deb_modes(deb: Path) -> dict[str, str]:
    """Absolute path -> its permissions as ``ls -l`` shows them, for every member of the .deb."""
    with tempfile.TemporaryFile() as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, check=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            return {m.name.removeprefix("."): stat.filemode(m.mode | (stat.S_IFDIR if m.isdir() else stat.S_IFREG))
                    for m in tar.getmembers()}


def deb_control_file(deb: Path, name: str) -> str:
    return out("dpkg-deb", "--info", str(deb), name)


# --- versions -------------------------------------------------------------------


@slow
def test_versions_come_from_the_version_file(packages: Built) -> None:
    deb_version = out("dpkg-deb", "--field", str(packages.deb), "Version").strip()
    assert deb_version.split("-")[0] == VERSION, "debian/changelog disagrees with the version file"
    rpm_version = out("rpm", "-qp", "--qf", "%{VERSION}", str(packages.rpm)).strip()
    assert rpm_version == VERSION
    assert "@VERSION@" in (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()


# --- the .deb ----------------------------------------------------------------------


@slow
def test_deb_control_fields(packages: Built) -> None:
    fields = out("dpkg-deb", "--field", str(packages.deb))
    assert re.search(r"^Section: admin$", fields, re.M)
    assert re.search(r"^Architecture: all$", fields, re.M)
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends is not None
    names = {d.strip().split()[0] for d in depends.group(1).split(",")}
    assert set(RUNTIME_DEPENDS) <= names, names
    assert any(n.startswith("python3") and n not in RUNTIME_DEPENDS for n in names), "no ${python3:Depends}"


@slow
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
    assert "/usr/share/doc/qubes-socksvc/README.md" in files  # the conffile points at it
    missing_docs = [d for d in DOCS if f"/usr/share/doc/qubes-socksvc/{d}" not in files]
    assert "docs/safety.md" in DOCS and not missing_docs, f"documentation not shipped: {missing_docs}"
    assert not [f for f in files if f.startswith("/usr/local/")]
    for page in MAN_PAGES:
        assert page in files
    assert sorted(deb_control_file(packages.deb, "conffiles").split()) == sorted(
        [POST_INSTALL_HOOK, "/etc/qubes-socksvc.yaml"])  # debhelper makes every file in /etc a conffile
    assert POST_INSTALL_HOOK in files and deb_modes(packages.deb)[POST_INSTALL_HOOK] == "-rwxr-xr-x"
    script = deb_member_text(packages.deb, "/usr/bin/qubes-socksvc")
    # dh-python 5 (Debian 12) writes "#!/usr/bin/python3", dh-python 6 (Debian 13) "#! /usr/bin/python3":
    # both are the same interpreter line to the kernel
    assert re.match(r"#! ?/usr/bin/python3\n", script), script.splitlines()[0]


@slow
def test_shipped_manifest_is_valid_and_declares_nothing(packages: Built, tmp_path: Path) -> None:
    conffile = tmp_path / "qubes-socksvc.yaml"
    conffile.write_text(deb_member_text(packages.deb, "/etc/qubes-socksvc.yaml"))
    result = run_cli("check", "-c", str(conffile), check=True)
    assert "0 daemons, 0 services" in result.stdout
    example = tmp_path / "example.yaml"
    example.write_text(deb_member_text(packages.deb, "/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml"))
    run_cli("check", "-c", str(example), check=True)


@slow
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
    # purge: the directories apply created go if empty (tests/test_purge.py runs the scripts)
    assert "record_absent_dirs" in postinst and "purge-dirs" in postinst
    assert 'rmdir "$dir"' in postrm and "purge-dirs" in postrm


@slow
def test_build_time_check_ran(packages: Built) -> None:
    """dh_auto_test and the spec's %check validated and rendered the example with the built modules."""
    assert packages.log.count("examples/qubes-socksvc.yaml: OK, 2 daemons") == 2  # .deb, then .rpm
    assert len(re.findall(r"^create +/etc/systemd/user/qubes-socksvc-example\.socket$", packages.log, re.M)) == 2
    assert re.search(r"^Executing\(%check\)", packages.log, re.M)


@slow
def test_standards_build_without_setup_py_or_deprecation_warnings(packages: Built) -> None:
    """PEP 517 wheels in both builds (pybuild's pyproject plugin, %pyproject_wheel or make wheel), no setup.py."""
    assert not (REPO / "setup.py").exists()
    assert "Building wheel for python3" in packages.log  # pybuild's pyproject plugin (python -m build)
    assert packages.log.count(f"Successfully built qubes_socksvc-{VERSION}-py3-none-any.whl") == 2
    assert "setup.py" not in packages.log
    assert not re.search(r"deprecat", packages.log, re.I), [
        line for line in packages.log.splitlines() if re.search(r"deprecat", line, re.I)]


@slow
def test_lintian_reports_no_errors(packages: Built) -> None:
    tags = packages.lintian_tags
    assert not [t for t in tags if t.startswith("E:")], "\n".join(tags)
    assert not [t for t in tags if "no-manual-page" in t], "\n".join(tags)
    warnings = {t.split()[2] for t in tags if t.startswith("W:")}
    assert warnings <= ACCEPTED_LINTIAN, f"new lintian warnings: {warnings - ACCEPTED_LINTIAN}"
    docs = "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")] if p.exists())
    for tag in warnings:
        assert tag in docs, f"lintian warning {tag} is not explained in docs/packaging.md"


# --- the .rpm ----------------------------------------------------------------------


def rpm_sitelib(files: set[str]) -> str:
    inits = [f for f in files if f.endswith("/qubes_socksvc/__init__.py")]
    assert len(inits) == 1, inits
    return inits[0].removesuffix("/qubes_socksvc/__init__.py")


@slow
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
    missing_docs = [d for d in DOCS if f"/usr/share/doc/qubes-socksvc/{d}" not in files]
    assert "docs/safety.md" in DOCS and not missing_docs, f"documentation not shipped: {missing_docs}"
    assert f"{sitelib}/qubes_socksvc-{VERSION}.dist-info/METADATA" in files  # a wheel's metadata, not an egg's
    for page in MAN_PAGES:
        assert page in files
    flags = dict(line.rsplit(" ", 1) for line in out(
        "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(packages.rpm)).splitlines()
        if line.count(" ") == 1)
    assert set(flags["/etc/qubes-socksvc.yaml"]) >= {"c", "n"}, "the manifest must be %config(noreplace)"
    assert POST_INSTALL_HOOK in flags and "c" not in flags[POST_INSTALL_HOOK]  # code, as core-agent ships its hooks
    assert "d" in flags["/usr/share/doc/qubes-socksvc/examples/qubes-socksvc.yaml"]
    licences = [f for f in files if re.fullmatch(r"/usr/share/licenses/qubes-socksvc[^/]*/LICENSE", f)]
    assert len(licences) == 1 and "l" in flags[licences[0]], "%license LICENSE"
    # the state directory is the package's; apply's record in it is a %ghost
    modes = dict(line.split(" ", 1)[::-1] for line in out(
        "rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", str(packages.rpm)).splitlines())
    assert modes["/var/lib/qubes-socksvc"].startswith("d")
    assert "g" in flags["/var/lib/qubes-socksvc/owned.json"]
    assert modes["/var/lib/qubes-socksvc/owned.json"] == "-rw-r--r--"
    assert modes[POST_INSTALL_HOOK] == "-rwxr-xr-x"  # qubes.PostInstall runs only executable hooks
    requires = out("rpm", "-qpR", str(packages.rpm)).split()
    for name in ("python3-jinja2", "python3-pyyaml", "python3-systemd", "systemd"):
        assert name in requires
    # what the scriptlets run must be there when they run
    kinds: dict[str, set[str]] = {}
    for line in out("rpm", "-qp", "--qf", "[%{REQUIRENAME} %{REQUIREFLAGS:deptype}\n]", str(packages.rpm)).splitlines():
        name, kind = line.split(" ", 1)
        kinds.setdefault(kind, set()).add(name)
    assert {"python3", "python3-jinja2", "python3-pyyaml", "coreutils"} <= kinds.get("post", set()), kinds
    assert {"python3", "python3-jinja2", "python3-pyyaml", "coreutils"} <= kinds.get("preun", set()), kinds
    assert "coreutils" in kinds.get("postun", set()), kinds


@slow
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


@slow
def test_rpm_scriptlets_as_built_remove_only_the_directories_apply_created(packages: Built, tmp_path: Path) -> None:
    """tests/test_purge.py's RPM erase, on the scriptlets rpmbuild expanded (%%, %{_localstatedir})."""
    from tests.test_purge import FOREIGN, LEFT, in_sandbox, paths

    scripts = out("rpm", "-qp", "--scripts", str(packages.rpm))
    scriptlet = re.compile(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", re.M | re.S)
    bindir = tmp_path / "bin"
    for section, body in scriptlet.findall(scripts):
        (tmp_path / section).write_text(body.replace("/usr/bin/qubes-socksvc", str(bindir / "qubes-socksvc")))
    listing = in_sandbox(
        f"sh {tmp_path}/postinstall 1\n{FOREIGN}sh {tmp_path}/postinstall 2\n"
        f"sh {tmp_path}/preuninstall 0\nsh {tmp_path}/postuninstall 0\nrm /etc/qubes-socksvc.yaml\n", bindir)
    assert paths(listing) == LEFT


@slow
@slow
def test_rpmlint_reports_only_what_docs_packaging_explains(packages: Built) -> None:
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint not installed ('make setup-test' installs it)")
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
        config.write('CompressExtension = "gz"\n')  # as Fedora's configuration: brp-compress gzips man pages
        config.flush()
        result = subprocess.run(["rpmlint", "-c", config.name, str(packages.rpm)], capture_output=True, text=True,
                                timeout=300)
    tags = set(re.findall(r"^qubes-socksvc\.noarch: [EW]: (\S+)", result.stdout, re.M))
    packaging = (REPO / "docs/packaging.md").read_text()
    section = packaging[packaging.index("### rpmlint"):]
    unexplained = sorted(t for t in tags if f"`{t}`" not in section)
    assert not unexplained, f"rpmlint tags not in docs/packaging.md's rpmlint section: {unexplained}\n{result.stdout}"


@slow
def test_deb_and_rpm_install_the_same_files(packages: Built) -> None:
    """One install path: apart from the Python directory and Debian's own docs, the payloads match."""
    rpm_all = set(out("rpm", "-qlp", str(packages.rpm)).split())
    rpm_dirs = {line.split()[-1] for line in out("rpm", "-qlvp", str(packages.rpm)).splitlines()
                if line.startswith("d")}
    sitelib = rpm_sitelib(rpm_all)

    def normal(path: str, lib: str) -> str:
        return path.replace(lib, "SITELIB", 1)

    # A .dist-info's bookkeeping differs with the tools and their versions, not with what is installed:
    # RECORD (dh-python 6 drops it), INSTALLER (dh-python 6 writes one), the licence's copy
    # (setuptools < 77: LICENSE, later: licenses/LICENSE; dh_python3 drops it).
    bookkeeping = re.compile(rf"SITELIB/qubes_socksvc-{re.escape(VERSION)}\.dist-info/"
                             r"(RECORD|INSTALLER|REQUESTED|direct_url\.json|LICENSE|licenses/.*)")

    ghosts = {line.split(" ", 1)[1] for line in out(
        "rpm", "-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", str(packages.rpm)).splitlines()
        if "g" in line.split(" ", 1)[0]}
    rpm_files = {normal(f, sitelib) for f in rpm_all - rpm_dirs - ghosts}
    debian_only = {"/usr/share/doc/qubes-socksvc/copyright", "/usr/share/doc/qubes-socksvc/changelog.Debian.gz"}
    deb = {normal(f, DEB_SITELIB) for f in deb_files(packages.deb) - debian_only}
    # The licence: debian/copyright in the .deb (dh_python3 drops the wheel's copy), %license in the .rpm.
    # Debian byte-compiles at install time, not in the package.
    rpm_files = {f for f in rpm_files if not re.fullmatch(r"/usr/share/licenses/[^/]+/LICENSE", f)
                 and not bookkeeping.fullmatch(f) and "/__pycache__/" not in f}
    deb = {f for f in deb if not bookkeeping.fullmatch(f)}
    assert f"SITELIB/qubes_socksvc-{VERSION}.dist-info/METADATA" in deb & rpm_files
    assert deb == rpm_files, f"only in .deb: {sorted(deb - rpm_files)}; only in .rpm: {sorted(rpm_files - deb)}"


# --- without building: licence, metadata, Qubes Builder -------------------------------

#: Files that are data, not source: they carry no header (the licence covers them through debian/copyright).
NOT_SOURCE = re.compile(r"(LICENSE|NEWS|version|.*\.md|\.gitignore|requirements-test\.txt|tests/golden/.*|.*/py\.typed"
                        r"|debian/(changelog|copyright|control|source/format)|etc/.*\.yaml|examples/.*\.yaml)")


def source_files() -> list[str]:
    """The tracked files (every file, where this is not a git checkout), less NOT_SOURCE."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        names = [n.decode() for n in listed.stdout.split(b"\0") if n]
    else:  # e.g. the copy "make trixie" runs the suite in
        skip = {".git", ".venv", "pkgs", "rpmbuild", "build", "__pycache__", ".pytest_cache", ".mypy_cache",
                ".ruff_cache", ".hypothesis"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p)]
    return sorted(n for n in names if (REPO / n).is_file() and not NOT_SOURCE.fullmatch(n))


def test_every_source_file_has_an_spdx_header() -> None:
    """``SPDX-License-Identifier: GPL-2.0-or-later`` and a copyright line at the top (after a #! line)."""
    files = source_files()
    assert "Makefile" in files and "qubes_socksvc/cli.py" in files and "debian/rules" in files
    missing = []
    for name in files:
        head = (REPO / name).read_text(errors="replace").splitlines()[:4]
        at = next((i for i, line in enumerate(head) if SPDX in line), None)
        if at is None or at > 1 or "Copyright" not in "".join(head[at + 1:at + 2]):
            missing.append(name)
    assert not missing, f"no SPDX header and copyright line at the top of: {missing}"


def test_one_licence_everywhere() -> None:
    """GPL-2.0-or-later: LICENSE is the GPL 2 text, and setup.cfg, the spec and debian/copyright say the same."""
    licence = (REPO / "LICENSE").read_text()
    assert licence.split()[:4] == ["GNU", "GENERAL", "PUBLIC", "LICENSE"]
    assert "Version 2, June 1991" in licence and "How to Apply These Terms" in licence
    assert re.search(r"^license = GPL-2\.0-or-later$", (REPO / "setup.cfg").read_text(), re.M)
    assert re.search(r"^license_files = LICENSE$", (REPO / "setup.cfg").read_text(), re.M)
    spec = (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()
    assert re.search(r"^License: +GPL-2\.0-or-later$", spec, re.M)
    assert re.search(r"^%license LICENSE$", spec, re.M)
    # debian/copyright: machine-readable (DEP-5), one GPL-2+ stanza for every file
    paragraphs = [dict(re.findall(r"^(\S+?): ?(.*)$", p, re.M)) for p in
                  (REPO / "debian/copyright").read_text().split("\n\n")]
    assert paragraphs[0]["Format"] == "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    files = [p for p in paragraphs if "Files" in p]
    assert [(p["Files"], p["License"]) for p in files] == [("*", "GPL-2+")]
    text = (REPO / "debian/copyright").read_text()
    assert "either version 2 of the License, or\n (at your option) any later version" in text
    assert "/usr/share/common-licenses/GPL-2" in text


def test_maintainer_fields_agree_and_name_no_repository_that_does_not_exist() -> None:
    maintainer = re.search(r"^Maintainer: (.+)$", (REPO / "debian/control").read_text(), re.M)
    assert maintainer is not None
    identity = maintainer.group(1)
    assert f" -- {identity}  " in (REPO / "debian/changelog").read_text()
    assert re.search(rf"^\* .* {re.escape(identity)} - ", (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text(), re.M)
    cfg = dict(re.findall(r"^(author|author_email) = (.+)$", (REPO / "setup.cfg").read_text(), re.M))
    assert f"{cfg['author']} <{cfg['author_email']}>" == identity
    for name in ("debian/control", "debian/copyright", "rpm_spec/qubes-socksvc.spec.in", "setup.cfg"):
        text = (REPO / name).read_text()
        assert "QubesOS/qubes-socksvc" not in text, f"{name} names a repository that does not exist"
        assert not re.search(r"^(Homepage|URL|url|Source) *[:=] *https?://", text, re.M), \
            f"{name}: a project URL with nothing behind it"


def test_news_is_in_step_with_both_changelogs() -> None:
    """NEWS has one section per released version, with the version and date of debian/changelog and %changelog."""
    news = re.findall(r"^(\d+(?:\.\d+)+) \((\d{4}-\d\d-\d\d)\)\n-+$", (REPO / "NEWS").read_text(), re.M)
    debian = [(version, email.utils.parsedate_to_datetime(date).strftime("%Y-%m-%d")) for version, date in zip(
        re.findall(r"^qubes-socksvc \(([^)]+)-\d+\) ", (REPO / "debian/changelog").read_text(), re.M),
        re.findall(r"^ -- .*?>  (.*)$", (REPO / "debian/changelog").read_text(), re.M), strict=True)]
    spec = (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()
    rpm = [(version, datetime.datetime.strptime(date, "%a %b %d %Y").strftime("%Y-%m-%d")) for date, version in
           re.findall(r"^\* (\w{3} \w{3} \d\d \d{4}) .* - ([^-\s]+)-\d+$", spec[spec.index("%changelog"):], re.M)]
    assert news and news == debian == rpm, f"NEWS {news}, debian/changelog {debian}, %changelog {rpm}"
    assert news[0][0] == VERSION, "NEWS has no section for the version file's version"


def test_qubesbuilder_builds_the_deb_and_the_rpm_from_the_version_file() -> None:
    """Qubes Builder v2 reads .qubesbuilder: the RPM for dom0 (host) and VMs, the Debian package for VMs.

    As in QubesOS/qubes-core-qrexec: a spec is named without its ``.in`` (the
    builder renders ``@VERSION@`` from the ``version`` file), Debian by its directory.
    """
    import yaml

    config = yaml.safe_load((REPO / ".qubesbuilder").read_text())
    assert config == {"host": {"rpm": {"build": ["rpm_spec/qubes-socksvc.spec"]}},
                      "vm": {"rpm": {"build": ["rpm_spec/qubes-socksvc.spec"]}, "deb": {"build": ["debian"]}}}
    assert "@VERSION@" in (REPO / "rpm_spec/qubes-socksvc.spec.in").read_text()
    assert (REPO / "debian/control").is_file() and (REPO / "debian/rules").is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", (REPO / "version").read_text())
    changelog = (REPO / "debian/changelog").read_text()
    assert changelog.startswith(f"qubes-socksvc ({(REPO / 'version').read_text().strip()}-")

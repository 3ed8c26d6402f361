# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The compiled spec: what apply validated is what the daemon runs, whatever the YAML does later."""

from __future__ import annotations

import hashlib
import os
import pwd
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.client import BenchError
from bench.processes import Process
from qubes_socksvc import cli, manifest, model, render
from qubes_socksvc.layout import File, Layout
from tests.conftest import DAEMON_USER, REPO, TESTS, apply, raw_call, run_cli, world_dir

MANIFEST = """\
version: 1
daemons:
  s:
    description: spec test
    idle_exit: 0
    services:
      spec.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
      spec.Fields:
        handler: handlers:fields
        timeout: 3
"""


class SpecDaemon:
    """``serve s --spec SPEC --bind-dir DIR`` as the daemon's user: what the unit runs (on the
    process harness, ``bench.processes.Process``)."""

    def __init__(self, spec: Path, bind_dir: Path, name: str = "s", notify: Path | None = None,
                 nofile: int | None = None) -> None:
        """``nofile``: a hard RLIMIT_NOFILE for the daemon (server.fd_budget caps its slots)."""
        extra = {"NOTIFY_SOCKET": str(notify)} if notify is not None else {}
        limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.bind_dir = bind_dir
        self.log = bind_dir / "daemon.log"
        self.socket = str(bind_dir / f"socksvc-{name}.sock")
        self.process = Process(
            f"daemon {name}", [sys.executable, "-P", "-m", "qubes_socksvc", "serve", name, "--spec", str(spec),
                               "--bind-dir", str(bind_dir)],
            self.socket, self.log, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{TESTS}", "HOME": "/tmp",
                                        **extra},
            user=DAEMON_USER, preexec_fn=limit)
        self.proc = self.process.proc
        try:
            self.process.wait_until(lambda: "serving" in self.log.read_text(), "serving", timeout=15)
        except BenchError as e:
            self.process.stop()
            raise AssertionError(str(e)) from e

    def call(self, payload: bytes) -> bytes:
        return raw_call(self.socket, payload)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def applied() -> Iterator[tuple[Path, Path]]:
    """(staging root with MANIFEST applied, the manifest's path)."""
    root = world_dir("socksvc-spec-")
    path = root / "manifest.yaml"
    path.write_text(MANIFEST)
    apply(path, root, check=True)
    yield root, path
    shutil.rmtree(root, ignore_errors=True)


def test_the_daemon_serves_what_apply_validated_whatever_the_yaml_does(applied: tuple[Path, Path]) -> None:
    root, path = applied
    spec = root / "var/lib/qubes-socksvc/daemons/s.json"
    assert oct(spec.stat().st_mode & 0o777) == "0o644"  # the user's daemon reads it
    for edit in ("version: 1\ndaemons:\n  s:\n    services:\n      spec.Other:\n        handler: a:b\n",
                 "this: is: not: a manifest\n", None):
        if edit is None:
            path.unlink()
        else:
            path.write_text(edit)
        daemon = SpecDaemon(spec, world_dir("socksvc-spec-bind-"))
        try:
            assert daemon.call(b"spec.Echo+ work\0hello") == b"hello"
            assert b"source='work'" in daemon.call(b"spec.Fields+ work\0")
            assert daemon.call(b"spec.Other+ work\0x") == b""  # only in the unapplied edit
        finally:
            daemon.stop()


def test_serve_imports_neither_yaml_nor_jinja(applied: tuple[Path, Path]) -> None:
    """Both load C extensions (PyYAML's _yaml, Jinja2's markupsafe._speedups): their absence
    from the running daemon's memory map shows neither was imported."""
    root, _ = applied
    daemon = SpecDaemon(root / "var/lib/qubes-socksvc/daemons/s.json", world_dir("socksvc-spec-bind-"))
    try:
        assert daemon.call(b"spec.Fields+ work\0")
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert "python3" in maps or "libpython" in maps  # the check reads a real map
        assert "_yaml" not in maps and "markupsafe" not in maps, "serve imported PyYAML or Jinja2"
    finally:
        daemon.stop()
    # The check can fail: serving from the YAML (-c, development) does import PyYAML.
    dev = subprocess.run([sys.executable, "-c", "import sys, qubes_socksvc.manifest; print('yaml' in sys.modules)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert dev.stdout.strip() == "True"


@pytest.mark.parametrize("text, words", [
    ("{}", "not a version 1 qubes-socksvc spec"),
    ("[" * 100000, "not a qubes-socksvc spec"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"services": {}}}', "daemon:"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "max_connections": "many", "services": {}}}', "max_connections: expected int"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "services": {"a": {"full_name": "a", "handler": "m:f", "evil": 1}}}}',
     "unknown keys evil"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "services": {"a": ["not", "an", "object"]}}}', "services.a: expected an object"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "qubes_service": 5, "services": {}}}',
     r"daemon.qubes_service: expected str \| None, got int"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "idle_exit": true, "services": {}}}',
     "daemon.idle_exit: expected float, got bool"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "services": {"a": {"full_name": "a", "handler": "m:f", '
     '"wait_for_session": "yes"}}}}', r"services.a.wait_for_session: expected bool \| None, got str"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": ["s"]}', "no daemon in the spec"),
    ('{"version": 1, "manifest": "m", "manifest_sha256": "h", "daemon": {"services": []}}', "no daemon in the spec"),
    ('{"version": 1, "manifest": "m", "daemon": {"name": "s", "description": "d", "socket": "/run/qubes/x.sock", '
     '"services": {}}}', "no manifest recorded in the spec"),
    ('{"version": 1, "manifest_sha256": "h", "daemon": {"name": "s", "description": "d", '
     '"socket": "/run/qubes/x.sock", "services": {}}}', "no manifest recorded in the spec"),
])
def test_a_bad_spec_is_refused_with_its_path(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(model.SpecError, match=words) as caught:
        model.load(str(path))
    assert str(path) in str(caught.value)


def test_a_spec_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_bytes(b'{"version": 1, "manifest": "\xff"}')
    with pytest.raises(model.SpecError, match="not UTF-8; run 'qubes-socksvc apply'"):
        model.load(str(tmp_path / "s.json"))


def test_a_fifo_spec_never_blocks(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "s.json")
    with pytest.raises(model.SpecError, match="not a regular file"):
        model.load(str(tmp_path / "s.json"))


# Random valid manifests: the daemon built from the compiled spec equals the one built from the YAML.
names = st.text("abcdefgh.", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
service = st.fixed_dictionaries({"handler": st.sampled_from(["m:f", "pkg.mod:obj.attr"])}, optional={
    "max_input": st.integers(0, 1 << 30), "timeout": st.floats(0, 1e6, allow_nan=False),
    "wait_for_session": st.booleans(), "exit_on_client_eof": st.booleans(), "exit_on_service_eof": st.booleans(),
})
daemon = st.fixed_dictionaries({"services": st.dictionaries(
    st.tuples(names, st.none() | st.text("xyz+", max_size=5)).map(lambda t: t[0] if t[1] is None else f"{t[0]}+{t[1]}"),
    service, min_size=1, max_size=4)}, optional={
    "description": st.text("abc %$\\é", min_size=1, max_size=10).filter(lambda d: d == d.strip()
                                                                          and not d.endswith("\\")),
    "idle_exit": st.integers(0, 10**6), "max_connections": st.integers(1, 10**4),
    "descriptor_timeout": st.floats(0.1, 100), "condition_user": st.sampled_from(["!root", "user", "1000"]),
})


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c-d"]), daemon, max_size=3))
def test_the_spec_round_trips_every_valid_manifest(daemons: dict[str, object]) -> None:
    import json

    text = json.dumps({"version": 1, "daemons": daemons})  # JSON is YAML
    try:
        parsed = manifest.parse(text, "/etc/qubes-socksvc.yaml")
    except manifest.ManifestError:
        return  # e.g. one service declared by two daemons
    layout = Layout.for_manifest(parsed)
    specs = {a.path: a.content for a in render.render(parsed, layout)
             if isinstance(a, File) and a.path.startswith(layout.spec_dir)}
    assert len(specs) == len(parsed.daemons)
    for name, from_yaml in parsed.daemons.items():
        compiled = model.parse(specs[layout.spec(name)], layout.spec(name))
        assert compiled.daemon == from_yaml
        assert (compiled.manifest, compiled.manifest_sha256) == ("/etc/qubes-socksvc.yaml", parsed.sha256)


@pytest.mark.parametrize("description, words", [
    ("line\\n[Service]\\nExecStartPre=/bin/evil", "one line of printable characters"),
    ("carriage\\rreturn", "one line of printable characters"),
    ("nul\\0byte", "one line of printable characters"),
    ("escape\\x1b[2J", "one line of printable characters"),
    ("joins the next line\\\\", "must not end with a backslash"),
    (" padded", "must not start or end with blanks"),
])
def test_check_refuses_what_systemd_would_not_read_back(tmp_path: Path, description: str, words: str) -> None:
    """No value reaches a unit that systemd would parse as something else (a newline would add
    directives, a trailing backslash would swallow ConditionUser=)."""
    path = tmp_path / "m.yaml"
    path.write_text(f'version: 1\ndaemons:\n  d:\n    description: "{description}"\n'
                    "    services:\n      s.X:\n        handler: a:b\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1 and f"{path}:4:18: daemons.d.description: must " in result.stderr
    assert words in result.stderr, result.stderr


def test_a_manifest_path_that_would_inject_into_comments_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m\nExecStartPre=evil.yaml"
    path.write_text(MANIFEST)
    result = apply(path, tmp_path / "root")
    assert result.returncode == 1 and "a manifest path must be printable" in result.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("safe_path", [True, False])
def test_the_unit_never_imports_from_the_working_directory(applied: tuple[Path, Path], safe_path: bool) -> None:
    """A user's ~/asyncio.py must not run inside the daemon: the unit runs python3 -P (and in /).
    Without -P, `python3 -m` puts the working directory first on sys.path: the check can fail."""
    root, _ = applied
    home = world_dir("socksvc-home-")
    marker = home / "imported"
    (home / "asyncio.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('hijacked')\n")
    (home / "asyncio.py").chmod(0o644)
    pw = pwd.getpwnam(DAEMON_USER)
    argv = [sys.executable, *(["-P"] if safe_path else []), "-m", "qubes_socksvc", "serve", "s", "--spec",
            str(root / "var/lib/qubes-socksvc/daemons/s.json"), "--bind-dir", str(home)]
    proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(home)},
                            cwd=home, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (home / "socksvc-s.sock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() != safe_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


_WORDS = st.sampled_from(["serve", "--spec", "-c", "--config", "--bind-dir", "-h", "--", "-", "", "s", "a b",
                          "/var/lib/qubes-socksvc/daemons/s.json", "--spec=x", "-1", "check", "serve2"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.tuples(st.just("serve"), st.text(max_size=8) | _WORDS, st.just("--spec"),
                           st.text(max_size=8) | _WORDS).map(list),
                 st.lists(_WORDS, max_size=5)))
def test_the_units_command_line_is_parsed_as_argparse_parses_it(argv: list[str]) -> None:
    """cli.unit_command reads 'serve DAEMON --spec SPEC' without importing argparse: whatever it
    accepts, argparse gives the very same arguments."""
    fast = cli.unit_command(argv)
    if fast is not None:
        assert vars(fast) == vars(cli.build_parser().parse_args(argv))


def test_every_unit_apply_writes_starts_the_daemon_without_argparse(applied: tuple[Path, Path]) -> None:
    """The ExecStart= apply renders takes the short path; argparse is not imported on it (and is,
    on any other command line: the check can fail)."""
    root, _ = applied
    unit = (root / "etc/systemd/user/qubes-socksvc-s.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart=")).split()
    assert exec_start[1:4] == ["-P", "-m", "qubes_socksvc"]
    assert cli.unit_command(exec_start[4:]) is not None

    pw = pwd.getpwnam(DAEMON_USER)

    def imported(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-P", "-X", "importtime", "-m", "qubes_socksvc", *args],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                              user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd="/", timeout=60)
        assert proc.returncode == 1 and "no such file" in proc.stderr.lower(), proc.stderr[-2000:]
        return proc.stderr

    assert "| argparse" not in imported("serve", "s", "--spec", "/nonexistent/s.json")
    assert "| argparse" in imported("serve", "s", "--spec", "/nonexistent/s.json", "--bind-dir", "/tmp")


def test_documented_limits_of_the_spec(tmp_path: Path) -> None:
    """SECURITY.md: a spec is read up to 4 MiB; a service's max_input is 1 MiB by default."""
    spec = tmp_path / "big.json"
    spec.write_text("{}")
    os.truncate(spec, (4 << 20) + 1)
    with pytest.raises(model.SpecError, match=f"larger than {4 << 20} bytes"):
        model.load(str(spec))
    parsed = manifest.parse(MANIFEST, "/etc/qubes-socksvc.yaml")
    assert parsed.daemons["s"].services["spec.Fields"].max_input == 1 << 20  # declared without max_input


def test_documented_defaults_and_spec_name(applied: tuple[Path, Path]) -> None:
    """README: the manifest table's defaults, and "a spec is named by the first 12 hex digits of
    its manifest's SHA-256" (what STATUS= and list compare)."""
    root, path = applied
    spec = model.load(str(root / "var/lib/qubes-socksvc/daemons/s.json"))
    daemon = spec.daemon  # MANIFEST sets only idle_exit
    assert (daemon.max_connections, daemon.descriptor_timeout) == (256, 10)
    assert (daemon.socket_mode, daemon.socket_group, daemon.condition_user, daemon.condition_group) == \
        ("0660", "qubes", "!root", "qubes")
    default = manifest.parse(MANIFEST.replace("    idle_exit: 0\n", ""), str(path)).daemons["s"]
    assert default.idle_exit == 300
    assert spec.id == hashlib.sha256(path.read_bytes()).hexdigest()[:12]

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The Qubes-native switches (issue 24): ``qubes_service`` and ``enable`` per daemon, the
``features`` verb and the post-install hook that announces what apply recorded.

The rules come from Qubes' own sources: qvm-service names as qubes-core-admin
``qubes/ext/services.py: ServicesExtension.on_domain_feature_pre_set`` accepts them (at most
48 characters) and as qubes-core-agent-linux ``vm-systemd/qubes-sysinit.sh`` turns them into
``/run/qubes-service/NAME`` (``^[[:alnum:]_][[:alnum:]._-]*$``); the persistence rule and the
``+ARG`` cut of ``qubes-rpc/post-install.d/10-qubes-core-agent-rpc.sh``; the 63-character
QubesDB path of ``misc/qvm-features-request``.  The hook runs against stand-ins for
``qvm-features-request`` and ``qubesdb-read`` only: those two talk to dom0.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_socksvc import effective, install, manifest, model, render
from qubes_socksvc.layout import LOCAL, SYSTEM, Link
from qubes_socksvc.model import Manifest
from tests.conftest import REPO, apply_in_process, run_cli

HOOK = REPO / "etc/post-install.d/20-qubes-socksvc.sh"

BOTH = """\
version: 1
daemons:
  {name}:
    qubes_service: {service}
    enable: true
    services:
      {prefix}.Echo:
        handler: qubes_socksvc.examples:echo
      {prefix}.Greet+friend:
        handler: qubes_socksvc.examples:echo
forwards:
  {prefix}.Ssh:
    target: tcp:127.0.0.1:22
"""


def manifest_text(name: str = "nat", service: str = "socksvc-nat", prefix: str = "nat", **drop: bool) -> str:
    text = BOTH.format(name=name, service=service, prefix=prefix)
    for key in drop:
        text = "".join(line for line in text.splitlines(keepends=True) if not line.strip().startswith(f"{key}:"))
    return text


@pytest.fixture
def local_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest named local.yaml renders under /usr/local, as /usr/local/etc/qubes-socksvc.yaml does."""
    monkeypatch.setattr(Manifest, "is_local", property(lambda self: os.path.basename(self.path) == "local.yaml"))


# --- the manifest -----------------------------------------------------------------------


def test_defaults_unchanged() -> None:
    parsed = manifest.parse(manifest_text(qubes_service=True, enable=True), "/m.yaml")
    daemon = parsed.daemons["nat"]
    assert daemon.qubes_service is None and daemon.enable is False and daemon.condition_path is None
    spec = model.dump(daemon, "/m.yaml", "0" * 64)
    assert "qubes_service" not in spec and "enable" not in spec  # specs of such daemons are as before
    for artifact in render.render(parsed, SYSTEM):
        assert "ConditionPathExists" not in getattr(artifact, "content", "")
        assert "sockets.target.wants" not in artifact.path


@pytest.mark.parametrize(("value", "why"), [
    ('".hidden"', "not starting with '.'"),
    ('"-dash"', "not starting with '.' or '-'"),
    ('"a/b"', "[A-Za-z0-9_.-]"),
    ('"a b"', "[A-Za-z0-9_.-]"),
    ('"%n"', "[A-Za-z0-9_.-]"),
    ('".."', "not starting with '.'"),
    ('""', "[A-Za-z0-9_.-]"),
    ('"' + "x" * 49 + '"', "longer than 48 (qubes-core-admin qubes/ext/services.py: on_domain_feature_pre_set)"),
    ("7", "expected a string"),
])
def test_qubes_service_names_dom0_and_the_qube_accept(value: str, why: str) -> None:
    """on_domain_feature_pre_set (no '/', not '.'/'..', at most 48) and qubes-sysinit.sh's
    ``^[[:alnum:]_][[:alnum:]._-]*$``: anything else never becomes /run/qubes-service/NAME."""
    text = manifest_text().replace("qubes_service: socksvc-nat", f"qubes_service: {value}")
    with pytest.raises(manifest.ManifestError) as e:
        manifest.parse(text, "/m.yaml")
    assert e.value.problems[0].startswith("/m.yaml:4:20: daemons.nat.qubes_service: "), e.value.problems
    assert why in e.value.problems[0]


def test_qubes_service_of_48_and_enable_accepted_and_typed() -> None:
    name = "A_b.c-" + "x" * 42
    parsed = manifest.parse(manifest_text(service=name), "/m.yaml")
    assert parsed.daemons["nat"].qubes_service == name and parsed.daemons["nat"].enable is True
    with pytest.raises(manifest.ManifestError) as e:
        manifest.parse(manifest_text().replace("enable: true", "enable: 1"), "/m.yaml")
    assert e.value.problems == ["/m.yaml:5:13: daemons.nat.enable: expected a boolean (true/false), got an integer"]


def test_both_units_wait_for_the_qubes_service() -> None:
    parsed = manifest.parse(manifest_text(), "/m.yaml")
    units = {a.path: a for a in render.render(parsed, SYSTEM)}
    for kind in ("socket", "service"):
        text = units[f"/etc/systemd/user/qubes-socksvc-nat.{kind}"].content  # type: ignore[union-attr]
        assert "\nConditionPathExists=/run/qubes-service/socksvc-nat\n" in text
    link = units["/etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket"]
    assert link == Link("/etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket",
                        "/etc/systemd/user/qubes-socksvc-nat.socket")  # what systemctl --global enable makes
    local = {a.path for a in render.render(parsed, LOCAL)}
    assert "/usr/local/lib/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket" in local


def test_spec_carries_the_switches_and_refuses_a_bad_name(tmp_path: Path) -> None:
    daemon = manifest.parse(manifest_text(), "/m.yaml").daemons["nat"]
    text = model.dump(daemon, "/m.yaml", "0" * 64)
    assert model.parse(text, "/spec.json").daemon == daemon
    bad = text.replace('"socksvc-nat"', '"../etc"')
    with pytest.raises(model.SpecError, match=r"daemon\.qubes_service"):
        model.parse(bad, "/spec.json")


def test_check_explains_the_combinations(tmp_path: Path) -> None:
    cases = {
        "both": (manifest_text(), "note", "listens in the qubes where dom0 turned on socksvc-nat"),
        "service": (manifest_text(enable=True), "note", "for the users who enable its socket"),
        "enable": (manifest_text(qubes_service=True), "warning",
                   "enable: true without qubes_service: the socket listens in every qube based on this template, "
                   "for every user in group qubes"),
        "long": (manifest_text(service="s" * 28), "warning", "too long for qvm-features-request"),
    }
    for name, (text, level, words) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        result = run_cli("check", "-c", str(path), "--root", str(tmp_path / "root"))
        assert result.returncode == 0, result.stderr  # a warning, never an error
        shown = result.stderr if level == "warning" else result.stdout
        assert f"{level:9} daemons.nat" in shown and words in shown, (name, result.stdout, result.stderr)
    path = tmp_path / "plain.yaml"
    path.write_text(manifest_text(qubes_service=True, enable=True))
    result = run_cli("check", "-c", str(path), "--root", str(tmp_path / "root"))
    assert "note" not in result.stdout and "warning" not in result.stderr


@pytest.mark.parametrize(("conditions", "who"), [
    ("", "for every user in group qubes"),
    ("    condition_group: '!qubes'\n", "for every user not in group qubes"),
    ("    condition_group: wheel\n    condition_user: alice\n",
     "for every user in group wheel (and ConditionUser=alice)"),
])
def test_check_says_whose_managers_start_the_socket(tmp_path: Path, conditions: str, who: str) -> None:
    """ConditionGroup=!qubes starts the socket for the users *outside* the group (systemd.unit(5)):
    check's warning about ``enable: true`` must say so, not the opposite."""
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(qubes_service=True).replace("    enable: true\n", f"    enable: true\n{conditions}"))
    result = run_cli("check", "-c", str(path), "--root", str(tmp_path / "root"))
    assert result.returncode == 0 and f"template, {who}; add" in result.stderr, result.stderr


@pytest.mark.parametrize(("length", "warned"), [(27, False), (28, True)])
def test_check_warns_of_a_qubes_service_qubesdb_cannot_announce(tmp_path: Path, length: int, warned: bool) -> None:
    """/features-request/supported-service.NAME holds 63 characters (misc/qvm-features-request):
    a NAME of 27 is announced, one of 28 is warned about, and the warning gives the bound."""
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(service="s" * length))
    result = run_cli("check", "-c", str(path), "--root", str(tmp_path / "root"))
    assert result.returncode == 0, result.stderr
    assert ("too long for qvm-features-request" in result.stderr) is warned, result.stderr
    if warned:
        assert "a name of at most 27 characters is announced" in result.stderr


# --- apply: the enable link, owned and recorded ---------------------------------------------


def test_enable_link_written_recorded_and_removed_with_the_key_and_the_daemon(tmp_path: Path) -> None:
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    wants = root / "etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket"
    path.write_text(manifest_text())
    code, out = apply_in_process(path, root)
    assert code == 0, out
    assert os.readlink(wants) == "/etc/systemd/user/qubes-socksvc-nat.socket"
    assert "/etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket" in install.load_state(str(root), SYSTEM)
    lines = out.splitlines()
    assert lines.index(f"create    {'/etc/systemd/user/qubes-socksvc-nat.socket'}") < \
        next(i for i, line in enumerate(lines) if "sockets.target.wants" in line)  # the unit first
    path.write_text(manifest_text(enable=True))
    code, out = apply_in_process(path, root)
    assert code == 0 and not os.path.lexists(wants), out
    assert "remove    /etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket" in out
    path.write_text(manifest_text())
    assert apply_in_process(path, root)[0] == 0 and os.path.islink(wants)
    path.write_text("version: 1\ndaemons: {}\n")
    code, out = apply_in_process(path, root)
    assert code == 0 and not os.path.lexists(wants), out
    lines = out.splitlines()
    assert next(i for i, line in enumerate(lines) if "sockets.target.wants" in line) < \
        lines.index("remove    /etc/systemd/user/qubes-socksvc-nat.socket")  # the link goes first
    assert install.load_state(str(root), SYSTEM) == {}


def test_a_foreign_enable_link_is_a_conflict_and_a_symlinked_wants_dir_is_refused(tmp_path: Path) -> None:
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text())
    wants = root / "etc/systemd/user/sockets.target.wants"
    wants.mkdir(parents=True)
    (wants / "qubes-socksvc-nat.socket").symlink_to("/elsewhere.socket")
    code, out = apply_in_process(path, root)
    assert code == 1 and "conflict  /etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket" in out
    assert not (root / "etc/systemd/user/qubes-socksvc-nat.socket").exists()  # nothing written
    (wants / "qubes-socksvc-nat.socket").unlink()
    wants.rmdir()
    (tmp_path / "away").mkdir()
    wants.symlink_to(tmp_path / "away")
    code, out = apply_in_process(path, root)
    assert code == 1 and "is a symlink; refusing to write through it" in out, out
    assert list((tmp_path / "away").iterdir()) == []


def test_same_link_made_by_systemctl_is_adopted(tmp_path: Path) -> None:
    """``systemctl --global enable`` made the very link before: apply takes it over (unchanged)."""
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text())
    wants = root / "etc/systemd/user/sockets.target.wants"
    wants.mkdir(parents=True)
    (wants / "qubes-socksvc-nat.socket").symlink_to("/etc/systemd/user/qubes-socksvc-nat.socket")
    code, out = apply_in_process(path, root)
    assert code == 0 and "sockets.target.wants" not in out, out


def test_safe_order_puts_the_enable_link_after_its_unit_and_removes_it_first(tmp_path: Path) -> None:
    parsed = manifest.parse(manifest_text(), str(tmp_path / "m.yaml"))
    artifacts, _ = effective.settle(parsed, SYSTEM, render.render(parsed, SYSTEM), str(tmp_path))
    # Sorted so the link would come first: the order must not rest on the paths' spelling.
    plan = install.plan(artifacts, SYSTEM, str(tmp_path))
    plan = install.Plan(sorted(plan.actions, key=lambda a: "sockets.target.wants" not in a.path), SYSTEM, plan.root)
    ordered = effective.safe_order(plan, parsed)
    assert isinstance(ordered, install.Plan)
    paths = [a.path for a in ordered.changes]
    assert paths.index("/etc/systemd/user/qubes-socksvc-nat.socket") < \
        paths.index("/etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket")
    removing = install.Plan([install.Action(install.Verb.REMOVE, a.path, current="x") for a in plan.changes],
                            SYSTEM, plan.root)
    ordered = effective.safe_order(removing, manifest.parse("version: 1\ndaemons: {}\n", "/m.yaml"))
    assert isinstance(ordered, install.Plan)
    paths = [a.path for a in ordered.changes]
    assert paths.index("/etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket") < \
        paths.index("/etc/systemd/user/qubes-socksvc-nat.socket")


def test_safe_order_replacing_a_daemon_writes_the_new_one_before_removing_the_old(tmp_path: Path) -> None:
    """One apply replaces daemon nat with web: every change exactly once; the qubes-rpc links
    and rpc-configs first; then web's unit, spec and enable link (the link after its unit);
    the removals last, nat's enable link before its unit: a kill at any point leaves a
    manager at least one whole daemon and never a wants link to a missing unit."""
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text())
    assert apply_in_process(path, root)[0] == 0
    path.write_text(manifest_text("web", "socksvc-web", "web"))
    parsed = manifest.load(str(path))
    artifacts, _ = effective.settle(parsed, SYSTEM, render.render(parsed, SYSTEM), str(root))
    plan = install.plan(artifacts, SYSTEM, str(root))
    ordered = effective.safe_order(plan, parsed)
    assert isinstance(ordered, install.Plan)
    paths = [a.path for a in ordered.changes]
    assert sorted(paths) == sorted(a.path for a in plan.changes) and len(set(paths)) == len(paths)
    rpc = [i for i, p in enumerate(paths) if os.path.dirname(p) in (SYSTEM.rpc_dir, SYSTEM.rpc_config_dir)]
    removals = [i for i, a in enumerate(ordered.changes) if a.verb is install.Verb.REMOVE
                and os.path.dirname(a.path) not in (SYSTEM.rpc_dir, SYSTEM.rpc_config_dir)]
    kept = [i for i in range(len(paths)) if i not in rpc and i not in removals]
    assert rpc and kept and removals and max(rpc) < min(kept) and max(kept) < min(removals), paths
    units, wants = "/etc/systemd/user", "/etc/systemd/user/sockets.target.wants"
    assert paths.index(f"{units}/qubes-socksvc-web.socket") < paths.index(f"{wants}/qubes-socksvc-web.socket")
    assert paths.index(f"{wants}/qubes-socksvc-nat.socket") < paths.index(f"{units}/qubes-socksvc-nat.socket")


def test_an_overlong_enable_link_name_is_refused_like_every_artifact(tmp_path: Path) -> None:
    """install's NAME_MAX rule covers the wants directory: a record naming a longer name there
    is a conflict, as in the unit directory."""
    root = tmp_path / "root"
    state = root / "var/lib/qubes-socksvc/owned.json"
    state.parent.mkdir(parents=True)
    long = f"{SYSTEM.wants_dir}/{'x' * 256}.socket"
    state.write_text(json.dumps({"version": 1, "owned": {long: ["00"]}}))
    plan = install.plan([], SYSTEM, str(root))
    assert [a.path for a in plan.conflicts] == [long]


# --- list -------------------------------------------------------------------------------


def test_list_shows_the_qubes_service_and_enabled(tmp_path: Path) -> None:
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text())
    assert apply_in_process(path, root)[0] == 0
    shown = run_cli("list", "-c", str(path), "--root", str(root)).stdout
    assert "daemon nat: qubes-socksvc daemon nat [enabled globally]" in shown
    assert "  qubes_service socksvc-nat: off in this qube (/run/qubes-service/socksvc-nat is missing" in shown
    assert "  enable link /etc/systemd/user/sockets.target.wants/qubes-socksvc-nat.socket: ok" in shown
    (root / "run/qubes-service").mkdir(parents=True)
    (root / "run/qubes-service/socksvc-nat").touch()
    shown = run_cli("list", "-c", str(path), "--root", str(root)).stdout
    assert "  qubes_service socksvc-nat: on in this qube (/run/qubes-service/socksvc-nat exists)" in shown
    path.write_text(manifest_text(enable=True))
    assert apply_in_process(path, root)[0] == 0
    shown = run_cli("list", "-c", str(path), "--root", str(root)).stdout
    assert "[not enabled]" in shown and "enable link" not in shown


# --- features and the hook ----------------------------------------------------------------


def staged(tmp_path: Path, local_by_name: None) -> Path:
    """A root where both manifests were applied: /etc's (etc.Echo, ...) and /usr/local's."""
    root = tmp_path / "root"
    for name, prefix in (("etc", "etc"), ("local", "loc")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(manifest_text(name=name, service=f"svc-{name}", prefix=prefix))
        code, out = apply_in_process(path, root)
        assert code == 0, out
    return root


ANNOUNCED = {
    "full": ["supported-rpc.etc.Echo=1", "supported-rpc.etc.Greet=1", "supported-rpc.etc.Ssh=1",
             "supported-service.svc-etc=1"],
    "rw-only": ["supported-rpc.loc.Echo=1", "supported-rpc.loc.Greet=1", "supported-rpc.loc.Ssh=1",
                "supported-service.svc-local=1"],
    "none": [],
}


@pytest.mark.parametrize("mode", sorted(ANNOUNCED))
def test_features_by_persistence_from_what_apply_recorded(tmp_path: Path, local_by_name: None, mode: str) -> None:
    """10-qubes-core-agent-rpc.sh: full -> /etc, rw-only -> /usr/local, else nothing; NAME without
    +ARG; every entry announced though no socket exists (core-agent's own hook needs ``-S``)."""
    root = staged(tmp_path, local_by_name)
    result = run_cli("features", "--root", str(root), "--persistence", mode)
    assert result.returncode == 0 and result.stdout.splitlines() == ANNOUNCED[mode], result
    # an edited but unapplied manifest announces nothing new
    (tmp_path / "etc.yaml").write_text(manifest_text(name="etc", service="svc-new", prefix="new"))
    assert run_cli("features", "--root", str(root), "--persistence", mode).stdout.splitlines() == ANNOUNCED[mode]


def test_features_leaves_out_what_qubesdb_cannot_hold(tmp_path: Path) -> None:
    """misc/qvm-features-request refuses a path over 63 characters: such a feature is left out,
    said on stderr, and the rest announced."""
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    long_service = "s" * 28  # supported-service. + 28 = 46 > 63 - len("/features-request/")
    path.write_text(manifest_text(service=long_service, prefix="p" * 20))
    assert apply_in_process(path, root)[0] == 0
    result = run_cli("features", "--root", str(root), "--persistence", "full")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"supported-rpc.{'p' * 20}.{name}=1" for name in ("Echo", "Greet", "Ssh")]
    assert f"supported-service.{long_service}: not announced" in result.stderr


@pytest.mark.parametrize(("length", "announced"), [(31, True), (32, False)])
def test_features_takes_a_request_path_of_63_characters(tmp_path: Path, length: int, announced: bool) -> None:
    """/features-request/supported-rpc.NAME: 63 characters are taken (a NAME of 31), 64 are not."""
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    prefix = "p" * (length - len(".Echo"))
    path.write_text(manifest_text(prefix=prefix, qubes_service=True))
    assert apply_in_process(path, root)[0] == 0
    result = run_cli("features", "--root", str(root), "--persistence", "full")
    assert result.returncode == 0
    assert (f"supported-rpc.{prefix}.Echo=1" in result.stdout.splitlines()) is announced, result
    assert (f"supported-rpc.{prefix}.Echo: not announced" in result.stderr) is not announced, result.stderr


def test_features_announces_no_service_for_a_daemon_without_qubes_service(tmp_path: Path) -> None:
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text(qubes_service=True))
    assert apply_in_process(path, root)[0] == 0
    result = run_cli("features", "--root", str(root), "--persistence", "full")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["supported-rpc.nat.Echo=1", "supported-rpc.nat.Greet=1",
                                          "supported-rpc.nat.Ssh=1"]


def test_features_without_qubesdb_read_takes_full(tmp_path: Path) -> None:
    """No qubesdb-read at all (not a qube, or it cannot run): taken as full, as core-agent's
    ``qubesdb-read ... || echo full`` does, never a traceback."""
    path, root = tmp_path / "m.yaml", tmp_path / "root"
    path.write_text(manifest_text())
    assert apply_in_process(path, root)[0] == 0
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_cli("features", "--root", str(root), env={"PATH": str(empty)})
    assert result.returncode == 0 and result.stderr == "", result
    assert result.stdout.splitlines() == ["supported-rpc.nat.Echo=1", "supported-rpc.nat.Greet=1",
                                          "supported-rpc.nat.Ssh=1", "supported-service.socksvc-nat=1"]


def test_features_reports_an_unreadable_record(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / "var/lib/qubes-socksvc/owned.json"
    state.parent.mkdir(parents=True)
    state.write_text("{")
    result = run_cli("features", "--root", str(root), "--persistence", "full")
    assert result.returncode == 1 and "unreadable ownership record" in result.stderr and result.stdout == ""


def stand_ins(tmp_path: Path, persistence: str | None) -> tuple[dict[str, str], Path]:
    """PATH with qvm-features-request (records its arguments) and qubesdb-read (prints
    ``persistence``, or fails when None), and qubes-socksvc running this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requests = tmp_path / "requests"
    scripts = {
        "qvm-features-request": f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done >> {shlex.quote(str(requests))}\n',
        "qubesdb-read": ('#!/bin/sh\n[ "$1" = /qubes-vm-persistence ] || exit 1\n'
                         + (f"echo {persistence}\n" if persistence is not None
                            else "echo 'Failed to connect' >&2; exit 1\n")),
        "qubes-socksvc": (f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} "
                          '-m qubes_socksvc "$@"\n'),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return env, requests


def run_hook(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(HOOK), str(root)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["full", "rw-only", "none", None])
def test_hook_requests_the_features_by_persistence(tmp_path: Path, local_by_name: None, mode: str | None) -> None:
    """All three modes, both manifests; qubesdb-read failing counts as full (``|| echo full``)."""
    root = staged(tmp_path, local_by_name)
    env, requests = stand_ins(tmp_path, mode)
    result = run_hook(root, env)
    said = "" if mode != "none" else ("qubes-socksvc features: persistence 'none' (qubesdb-read "
                                      "/qubes-vm-persistence): nothing here survives a restart, so nothing is "
                                      "announced\n")
    assert result.returncode == 0 and result.stderr == said, result
    got = requests.read_text().splitlines() if requests.exists() else []
    assert got == ANNOUNCED[mode or "full"]


def test_hook_never_fails_the_update(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env, requests = stand_ins(tmp_path, "full")
    assert run_hook(root, env).returncode == 0 and not requests.exists()  # nothing applied: nothing requested
    state = root / "var/lib/qubes-socksvc/owned.json"
    state.parent.mkdir(parents=True)
    state.write_text("{")
    result = run_hook(root, env)
    assert result.returncode == 0 and "unreadable ownership record" in result.stderr and "WARNING" in result.stderr
    (tmp_path / "bin/qvm-features-request").write_text("#!/bin/sh\necho refused >&2\nexit 1\n")
    state.unlink()
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text())
    assert apply_in_process(path, root)[0] == 0
    result = run_hook(root, env)
    assert result.returncode == 0 and "qvm-features-request failed" in result.stderr
    os.unlink(tmp_path / "bin/qubes-socksvc")
    result = run_hook(root, env)
    assert result.returncode == 0 and "qubes-socksvc not found" in result.stderr
    os.unlink(tmp_path / "bin/qvm-features-request")
    result = run_hook(root, env)
    assert result.returncode == 0 and result.stderr == ""  # not a qube: silent


def test_hook_is_executable_and_numbered_before_core_agents_commit() -> None:
    """qubes.PostInstall runs only executable *.sh files, in glob order, and
    90-qubes-core-agent.sh sends the requests: ours must come before it."""
    assert HOOK.stat().st_mode & stat.S_IXUSR
    assert HOOK.name.endswith(".sh") and HOOK.name < "90-qubes-core-agent.sh"

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``check``/``apply`` judge the whole disk by the calls qrexec would make of it: no
false conflicts where qrexec's own lookup makes a state safe, forward targets compared
where the kernel takes them, and what volatile files in ``/run`` cause."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

import pytest

from qubes_socksvc import cli, effective, install, rpcconfig
from qubes_socksvc.layout import LAYOUTS, File, Link
from qubes_socksvc.manifest import parse
from tests import qrexec_view


def run(verb: str, manifest: Path, root: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main([verb, "-c", str(manifest), "--root", str(root)])
    return code, out.getvalue()


def write(tmp_path: Path, text: str) -> tuple[Path, Path]:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text)
    return manifest, tmp_path / "root"


# --- no false conflicts --------------------------------------------------------------------

HANDLER = "        handler: qubes_socksvc.examples:echo\n"


@pytest.mark.parametrize("option", ["wait_for_session: true", "service_descriptor: false"])
def test_a_plain_name_beside_a_name_plus_with_options_applies(tmp_path: Path, option: str) -> None:
    """libqrexec/exec.c: parse_qubes_rpc_command looks a bare call NAME up as NAME+ first, for
    the service file (find_qrexec_service) and for the rpc-config (load_service_config_raw)
    alike: the bare call is NAME+'s, with NAME+'s config, as declared.  Was refused."""
    manifest, root = write(tmp_path, "version: 1\ndaemons:\n  d:\n    services:\n"
                           f"      my.Svc:\n{HANDLER}      my.Svc+:\n{HANDLER}        {option}\n")
    code, output = run("apply", manifest, root)
    assert code == 0 and "conflict" not in output, output
    assert run("check", manifest, root)[0] == 0
    reading = {"/run/qubes/socksvc-d.sock"}
    sockets = {"/run/qubes/socksvc-d.sock", "/run/qubes/socksvc-my.Svc+.sock"}
    assert not qrexec_view.forgeable(root, reading, {"qubes-socksvc-d.socket": sockets})
    # The bare call reaches NAME+ and takes NAME+'s config (qrexec_view: exec.c alone).
    entry = qrexec_view.service_entry(root, "my.Svc", sockets, sockets)
    assert entry is not None and entry[0] == "/etc/qubes-rpc/my.Svc+"
    assert qrexec_view.skips_descriptor(root, "my.Svc")[0] in (None, "/etc/qubes/rpc-config/my.Svc+")


def test_an_entry_apply_removes_shadows_nothing(tmp_path: Path) -> None:
    """A bare call of my.Svc looks up my.Svc+ first (exec.c): once a re-apply removes the
    my.Svc+ link, the bare call reaches my.Svc's, and apply must not warn that something else
    is found first."""
    both = f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n{HANDLER}      my.Svc+:\n{HANDLER}"
    manifest, root = write(tmp_path, both)
    assert run("apply", manifest, root)[0] == 0
    manifest.write_text(both.split("      my.Svc+:")[0])
    code, output = run("apply", manifest, root)
    assert code == 0 and not (root / "etc/qubes-rpc/my.Svc+").exists(), output
    assert "finds first" not in output, output
    code, output = run("check", manifest, root)
    assert code == 0 and "finds first" not in output, output


def test_a_foreign_link_shadows_a_service_only_while_it_leads_somewhere(tmp_path: Path) -> None:
    """exec.c find_file: a link whose target does not exist is skipped like a missing file, so a
    dangling foreign link before ours shadows nothing; one to a socket that exists is what
    qrexec connects to: apply warns that calls reach it first."""
    import socket

    for live in (False, True):
        (tmp_path / str(live)).mkdir()
        manifest, root = write(tmp_path / str(live), f"version: 1\ndaemons:\n  d:\n    services:\n"
                                                     f"      my.Svc:\n{HANDLER}")
        foreign = root / "usr/local/etc/qubes-rpc/my.Svc"
        foreign.parent.mkdir(parents=True)
        foreign.symlink_to("../../../../run/other/svc.sock")  # relative: the same inside the staging root
        (root / "run/other").mkdir(parents=True)
        (root / "run/qubes").mkdir(parents=True)
        with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as ours:
            ours.bind(str(root / "run/qubes/socksvc-d.sock"))  # known sockets are matched by inode too
            if live:
                listener.bind(str(root / "run/other/svc.sock"))
            code, output = run("apply", manifest, root)
        assert code == 0, output
        warned = "calls of my.Svc (and my.Svc+) reach /usr/local/etc/qubes-rpc/my.Svc" in output
        assert warned == live, output


def test_a_forward_name_plus_beside_a_service_name_applies(tmp_path: Path) -> None:
    """exec.c: a bare call of my.Svc (and my.Svc+) finds the forward's my.Svc+ link and its
    config (skip-service-descriptor=true, as the forward declares); my.Svc+ARG finds the
    service's my.Svc link and no config but defaults.  Was refused as a conflict."""
    manifest, root = write(tmp_path, "version: 1\ndaemons:\n  d:\n    services:\n"
                           f"      my.Svc:\n{HANDLER}forwards:\n  my.Svc+:\n    target: tcp:127.0.0.1:22\n")
    code, output = run("apply", manifest, root)
    assert code == 0 and "conflict" not in output, output
    pin = rpcconfig.parse((root / "etc/qubes/rpc-config/my.Svc+").read_text())
    assert pin == rpcconfig.Config(skip_service_descriptor=True)
    assert not (root / "etc/qubes/rpc-config/my.Svc").exists()
    assert not qrexec_view.forgeable(root, {"/run/qubes/socksvc-d.sock"},
                                     {"qubes-socksvc-d.socket": {"/run/qubes/socksvc-d.sock"}})


def applied_beside(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """DAEMON applied, then a foreign link ``name`` to its socket with an rpc-config of the same
    name that skips the descriptor."""
    manifest, root = write(tmp_path, DAEMON)
    assert run("apply", manifest, root)[0] == 0
    (root / "etc/qubes-rpc" / name).symlink_to("/run/qubes/socksvc-d.sock")
    (root / "etc/qubes/rpc-config").mkdir(parents=True, exist_ok=True)
    (root / "etc/qubes/rpc-config" / name).write_text("skip-service-descriptor=true\n")
    return manifest, root


def test_a_forgeable_bare_call_is_reported_once(tmp_path: Path) -> None:
    """A bare call and NAME+ are one call to qrexec (exec.c looks the bare call up as NAME+):
    a NAME+ file planted beside an applied NAME makes one forgeable call, reported once under
    both spellings, and check names the file to remove."""
    manifest, root = applied_beside(tmp_path, "my.Svc+")
    code, output = run("check", manifest, root)
    forged = [line for line in output.splitlines() if "FORGEABLE" in line]
    assert code == 1 and len(forged) == 1, output
    assert "FORGEABLE: calls of my.Svc (and my.Svc+) can reach /etc/qubes-rpc/my.Svc+" in forged[0], output
    assert "from /etc/qubes/rpc-config/my.Svc+" in forged[0], output


def test_a_file_name_qrexec_cannot_call_is_no_call(tmp_path: Path) -> None:
    """An editor's backup beside a service (my.Svc~) is no call: qrexec refuses a service name
    outside [A-Za-z0-9_.+-] before any lookup (qrexec-daemon.c: validate_service_name;
    exec.c: parse_qubes_rpc_command), so its link and its rpc-config are never evaluated."""
    manifest, root = applied_beside(tmp_path, "my.Svc~")
    code, output = run("check", manifest, root)
    assert code == 0 and "my.Svc~" not in output, output


# --- forward targets where the kernel takes them -------------------------------------------


DAEMON = f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n{HANDLER}"


@pytest.mark.parametrize("target, setup", [
    ("/var/run/qubes/socksvc-d.sock", None),  # /var/run -> /run on every systemd system
    ("/srv/link/socksvc-d.sock", ("srv/link", "/run/qubes")),  # a symlinked directory
    ("/srv/abs/qubes/socksvc-d.sock", ("srv/abs", "../run")),
])
def test_a_forward_to_a_daemons_socket_through_another_spelling_is_refused(
        tmp_path: Path, target: str, setup: tuple[str, str] | None) -> None:
    """The daemon's socket reached through /var/run or a symlinked directory would get the
    forward's skip-service-descriptor=true: the caller's stdin read as the descriptor."""
    # A second forward after it, judged too (each forward's finding is its own).
    manifest, root = write(tmp_path, DAEMON + f"forwards:\n  my.Fwd:\n    target: unix:{target}\n"
                                             "  my.Tmp:\n    target: unix:/tmp/x.sock\n")
    if setup is not None:
        (root / os.path.dirname(setup[0])).mkdir(parents=True)
        (root / setup[0]).symlink_to(setup[1])
    for verb in ("check", "apply"):
        code, output = run(verb, manifest, root)
        assert code == 1, output
        assert f"conflict  my.Fwd: forwards.my.Fwd.target: {target} is a socket of qubes-socksvc-d.socket" \
            in output, output
        assert "declare my.Fwd as a service of that daemon instead" in output
        assert "conflict  my.Tmp: forwards.my.Tmp.target" in output and "where any user can bind" in output
    assert not (root / "etc").exists()


@pytest.mark.parametrize("target", ["/tmp/x.sock", "/dev/shm/x.sock", "/var/tmp/s/x.sock", "/run/lock/x.sock",
                                    "/var/lock/x.sock", "/srv/open/x.sock"])
def test_a_forward_into_a_world_writable_directory_is_refused_with_the_fix(tmp_path: Path, target: str) -> None:
    """Any user can bind a socket in a world-writable directory before the server does (or
    after it stops) and receive every caller's data."""
    manifest, root = write(tmp_path, "version: 1\nforwards:\n  a.Tcp:\n    target: tcp:127.0.0.1:22\n"
                                     f"  my.Fwd:\n    target: unix:{target}\n")  # after a TCP forward
    (root / "srv/open").mkdir(parents=True)
    (root / "srv/open").chmod(0o1777)
    code, output = run("apply", manifest, root)
    assert code == 1 and "where any user can bind a socket before the server does" in output, output
    assert "move the server's socket to a directory only its owner can write" in output


def test_a_forward_in_a_private_directory_applies(tmp_path: Path) -> None:
    manifest, root = write(tmp_path, "version: 1\nforwards:\n  my.Fwd:\n    target: unix:/srv/app/app.sock\n")
    (root / "srv/app").mkdir(parents=True, mode=0o755)
    code, output = run("apply", manifest, root)
    assert code == 0, output


def test_resolve_follows_links_like_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("a/b")
    (tmp_path / "abs").symlink_to("/a")
    (tmp_path / "loop").symlink_to("/loop")
    assert effective.resolve(str(tmp_path), "/rel/s.sock") == "/a/b/s.sock"
    assert effective.resolve(str(tmp_path), "/abs/b/../b/s.sock") == "/a/b/s.sock"
    assert effective.resolve(str(tmp_path), "/var/run/x") == "/run/x"
    assert effective.resolve(str(tmp_path), "/missing/x") == "/missing/x"
    assert effective.resolve(str(tmp_path), "/loop/x").startswith("/loop")  # ELOOP ends it
    (tmp_path / "x/y").mkdir(parents=True)
    (tmp_path / "x/rel").symlink_to("y")  # relative to the link's own directory, not to the root
    assert effective.resolve(str(tmp_path), "/x/rel/s.sock") == "/x/y/s.sock"
    assert effective.resolve(str(tmp_path), "/./x/./rel/./s.sock") == "/x/y/s.sock"  # "." names no entry


def test_a_write_tried_and_undone_leaves_the_model_of_the_disk_as_it_was(tmp_path: Path) -> None:
    """effective.safe_order tries each of apply's writes on its model of the disk and undoes
    those that would open a forgeable call: an undone write leaves no trace (the path reads as
    the disk has it), and a path written twice gets its first write back."""
    tree = effective.Tree(effective._Disk(str(tmp_path)), {})
    path = "/etc/qubes-rpc/my.Svc"
    undo = tree.update({path: Link(path, "/run/qubes/socksvc-d.sock")})
    assert tree.entry(path) == ("link", "/run/qubes/socksvc-d.sock") and tree.files("my.Svc") == {"my.Svc"}
    tree.undo(undo)
    assert tree.entry(path) is None and tree.files("my.Svc") == set()
    first = tree.update({path: Link(path, "/run/a.sock")})
    second = tree.update({path: None})
    assert tree.entry(path) is None
    tree.undo(second)
    assert tree.entry(path) == ("link", "/run/a.sock")
    tree.undo(first)
    assert tree.entry(path) is None and tree.files("my.Svc") == set()


def test_a_known_socket_under_another_name_is_that_socket_whichever_sockets_are_missing(tmp_path: Path) -> None:
    """effective.Sockets knows a daemon's socket under every name of it (a hard link is the
    same inode): a known socket that is not there (its unit stopped) hides none of the others,
    and a name that is itself known stays itself, even when another known name is the same
    file (a spec's socket and a forward's target both naming one socket)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "b.sock").write_text("")
    os.link(run_dir / "b.sock", run_dir / "other-name")
    os.link(run_dir / "b.sock", run_dir / "u.sock")
    known = effective.Sockets(str(tmp_path), {"/run/a.sock": "a, stopped", "/run/b.sock": "b"}, {"/run/u.sock": "u"})
    assert known.canonical("/run/other-name") in ("/run/b.sock", "/run/u.sock")
    assert known.canonical("/run/b.sock") == "/run/b.sock" and known.canonical("/run/u.sock") == "/run/u.sock"
    assert known.canonical("/run/a.sock") == "/run/a.sock"
    assert known.canonical("/run/elsewhere") == "/run/elsewhere"


def test_writes_that_no_order_keeps_safe_are_refused_with_nothing_written(tmp_path: Path) -> None:
    """effective.safe_order's contract where every order fails: a link to a daemon's socket
    and a config skipping the descriptor for the same call are forgeable together, whichever
    comes first (apply settles its writes so that this never happens: the search's net)."""
    parsed = parse(f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc+x:\n{HANDLER}", "/m.yaml")
    config = "/etc/qubes/rpc-config/my.Svc+x"
    plan = install.Plan([
        install.Action(install.Verb.CREATE, "/etc/qubes-rpc/my.Svc+x", Link("/etc/qubes-rpc/my.Svc+x",
                                                                            "/run/qubes/socksvc-d.sock")),
        install.Action(install.Verb.CREATE, config, File(config, "skip-service-descriptor = true\n"))],
        LAYOUTS[0], str(tmp_path))
    found = effective.safe_order(plan, parsed)
    assert isinstance(found, effective.Finding), found
    assert found.conflict and found.key == "my.Svc" and "no order of apply's writes" in found.message
    # Either write alone is safe: the search took the link, then tried the config and undid it.
    for alone in plan.changes:
        ordered = effective.safe_order(install.Plan([alone], LAYOUTS[0], str(tmp_path)), parsed)
        assert isinstance(ordered, install.Plan) and ordered.changes == [alone]


@pytest.mark.parametrize("links", [39, 40, 41])
def test_resolve_gives_up_on_a_chain_of_links_where_the_kernel_does(tmp_path: Path, links: int) -> None:
    """A socket behind a chain of links is reached, or not, as open() would reach it: the
    kernel follows 40 links in one lookup and fails the 41st with ELOOP (fs/namei.c:
    MAXSYMLINKS); a judge that followed one more or one fewer would call a link to a daemon's
    socket harmless (or not) where qrexec's connect() reaches it (or fails)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "s.sock").write_text("")
    for i in range(links):
        (tmp_path / f"l{i}").symlink_to(f"l{i + 1}" if i + 1 < links else "d")
    try:
        os.stat(tmp_path / "l0" / "s.sock")
        kernel_reaches = True
    except OSError as e:
        assert e.errno == errno.ELOOP, e
        kernel_reaches = False
    assert kernel_reaches == (links <= 40)  # the kernel's own limit, as the test assumes it
    assert (effective.resolve(str(tmp_path), "/l0/s.sock") == "/d/s.sock") == kernel_reaches


# --- volatile files in /run -----------------------------------------------------------------

RAW = f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc+x:\n{HANDLER}      my.Svc:\n{HANDLER}" \
      "        service_descriptor: false\n"


def plant(root: Path, name: str, text: str) -> None:
    path = root / "run/qubes/rpc-config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_planted_run_config_on_an_applied_service_warns_apply_and_fails_check(tmp_path: Path) -> None:
    """/run/qubes/rpc-config is group-qubes writable and first in QUBES_RPC_CONFIG_PATH: one
    file there wins every lookup.  Refusing apply would protect nothing (the file acts whether
    or not apply runs) and let any group member block every apply, postinst's too; so apply
    warns and goes on, and check and list fail while the disk is forgeable."""
    manifest, root = write(tmp_path, RAW)
    assert run("apply", manifest, root)[0] == 0
    plant(root, "my.Svc+x", "skip-service-descriptor=true\n")
    manifest.write_text(RAW.replace("my.Svc+x:\n", "my.Svc+x:\n        timeout: 5\n"))  # something to apply
    code, output = run("apply", manifest, root)
    assert code == 0, output
    assert "warning   my.Svc+x: FORGEABLE: calls of my.Svc+x can reach /etc/qubes-rpc/my.Svc+x" in output
    for verb in ("check", "list"):
        code, output = run(verb, manifest, root)
        assert code == 1 and "FORGEABLE" in output and "/run/qubes/rpc-config/my.Svc+x" in output, output
    # check says too that apply cannot mend it (a warning of apply, not a conflict, yet forgeable),
    # and that the disk is forgeable now, through a volatile file: a warning, as for apply
    output = run("check", manifest, root)[1]
    assert "valid, but apply would refuse it or leave it forgeable" in output, output
    now = [line for line in output.splitlines() if line.endswith("(on disk now)")]
    assert len(now) == 1 and now[0].startswith("warning   my.Svc+x: FORGEABLE"), output


def test_a_forgeable_call_of_a_file_name_of_name_max_bytes_is_named_as_it_is(tmp_path: Path) -> None:
    """exec.c find_file looks a key of NAME_MAX bytes up (only a longer one cannot exist): a
    planted config of exactly 255 bytes makes that one call forgeable, and the report names
    that call, not every argument without a file of its own."""
    manifest, root = write(tmp_path, f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n{HANDLER}")
    assert run("apply", manifest, root)[0] == 0
    call = "my.Svc+" + "a" * (255 - len("my.Svc+"))
    plant(root, call, "skip-service-descriptor=true\n")
    code, output = run("check", manifest, root)
    assert code == 1 and f"FORGEABLE: calls of {call} can reach /etc/qubes-rpc/my.Svc" in output, output


def test_an_rpc_config_qrexec_cannot_stat_fails_the_call_and_forges_nothing(tmp_path: Path) -> None:
    """exec.c find_file: an rpc-config entry whose stat() fails with anything but ENOENT (here a
    link to itself: ELOOP) fails the call (load_service_config_raw), so no caller's bytes reach
    the daemon through it: check reports the failing calls, and nothing forgeable."""
    manifest, root = write(tmp_path, RAW)
    assert run("apply", manifest, root)[0] == 0
    loop = root / "run/qubes/rpc-config/my.Svc+x"
    loop.parent.mkdir(parents=True)
    loop.symlink_to("my.Svc+x")
    code, output = run("check", manifest, root)
    assert code == 1 and "qrexec would fail calls of my.Svc+x" in output and "FORGEABLE" not in output, output


def test_a_service_entry_qrexec_cannot_stat_is_a_warning_of_failing_calls(tmp_path: Path) -> None:
    """exec.c find_file: a qubes-rpc entry whose stat() fails with anything but ENOENT (a link
    to itself: ELOOP) fails the call: apply warns that calls of the key will fail (nothing is
    forged: the call never reaches a socket) and goes on."""
    manifest, root = write(tmp_path, RAW)
    loop = root / "run/qubes-rpc/my.Svc+x"
    loop.parent.mkdir(parents=True)
    loop.symlink_to("my.Svc+x")
    code, output = run("apply", manifest, root)
    assert code == 0 and "warning   my.Svc+x: qrexec would fail calls of my.Svc+x: " in output, output
    assert "FORGEABLE" not in output, output


def test_a_file_that_shadows_a_service_is_reported_once(tmp_path: Path) -> None:
    """A foreign executable my.Svc before ours takes the bare call and every my.Svc+ARG without
    a file of its own: one warning names it, not one for each kind of call."""
    manifest, root = write(tmp_path, f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n{HANDLER}")
    _shadow(root / "usr/local/etc/qubes-rpc/my.Svc", "an executable")
    code, output = run("apply", manifest, root)
    assert code == 0, output
    shadows = [line for line in output.splitlines() if "which qrexec finds first" in line]
    assert len(shadows) == 1 and "reach /usr/local/etc/qubes-rpc/my.Svc" in shadows[0], output


def _shadow(entry: Path, kind: str) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    if kind == "an executable":
        entry.write_text("#!/bin/sh\nexec true\n")
        entry.chmod(0o755)
    elif kind == "a directory":
        entry.mkdir()
    elif kind == "a file in place of its directory":  # lstat fails with ENOTDIR: exec.c fails the call
        entry.parent.rmdir()
        entry.parent.write_text("")
    else:
        entry.symlink_to("/dev/tcp/127.0.0.1/22")


@pytest.mark.parametrize("kind", ["an executable", "a directory", "a TCP forward", "a file in place of its directory"])
def test_an_entry_qrexec_stops_at_shadows_a_forgeable_one_behind_it(tmp_path: Path, kind: str) -> None:
    """find_qrexec_service (exec.c: find_file) takes the first entry of a call's name in the
    search path: an executable, a directory or a TCP forward there ends the lookup (the call
    runs it, or fails), and so does one lstat() fails on with anything but ENOENT (its
    directory is a file: ENOTDIR; find_file returns -2, the call fails), so the forgeable
    entry behind it is never reached, and check must not cry FORGEABLE for it.  Judged with
    qrexec_view (exec.c alone), for /run/qubes-rpc (our own rpc directory is /etc/qubes-rpc,
    behind it) and for /usr/local/etc/qubes-rpc."""
    for directory in ("run/qubes-rpc", "usr/local/etc/qubes-rpc"):
        (tmp_path / directory.replace("/", "-")).mkdir()
        manifest, root = write(tmp_path / directory.replace("/", "-"), RAW)
        assert run("apply", manifest, root)[0] == 0
        plant(root, "my.Svc+x", "skip-service-descriptor=true\n")
        code, output = run("check", manifest, root)
        assert code == 1 and "FORGEABLE" in output, output  # as in the test above, the disk is forgeable
        _shadow(root / directory / "my.Svc+x", kind)
        reading = {"/run/qubes/socksvc-d.sock"}
        assert not qrexec_view.forgeable(root, reading, {"qubes-socksvc-d.socket": reading}), kind
        code, output = run("check", manifest, root)
        assert code == 0 and "FORGEABLE" not in output, (directory, output)


def test_a_planted_run_config_cannot_make_apply_open_a_forgeable_call(tmp_path: Path) -> None:
    """But apply never adds the link that a planted file turns forgeable: that is a conflict,
    for a daemon's service and for a Qubes-aware forward of the manifest (its target reads a
    descriptor, and no record knows it yet)."""
    for name, text in (("daemon", RAW), ("forward", AWARE.replace("svc+x", "my.Svc+x"))):
        (tmp_path / name).mkdir()
        manifest, root = write(tmp_path / name, text)
        plant(root, "my.Svc+x", "skip-service-descriptor=true\n")
        code, output = run("apply", manifest, root)
        assert code == 1 and "conflict  my.Svc+x: FORGEABLE" in output, (name, output)
        assert not (root / "etc").exists() and not (root / "usr").exists()


def test_a_planted_run_config_that_changes_no_descriptor_is_a_warning(tmp_path: Path) -> None:
    manifest, root = write(tmp_path, RAW)
    plant(root, "my.Svc+x", "wait-for-session=true\n")
    code, output = run("apply", manifest, root)
    assert code == 0 and "warning   my.Svc+x: calls of my.Svc+x would take the rpc-config " \
        "/run/qubes/rpc-config/my.Svc+x" in output, output
    assert run("check", manifest, root)[0] == 0


# --- what the adversary found ---------------------------------------------------------------


@pytest.fixture
def local_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest named local.yaml renders under /usr/local (as tests/test_every_instant does)."""
    from qubes_socksvc.manifest import Manifest

    monkeypatch.setattr(Manifest, "is_local", property(lambda self: os.path.basename(self.path) == "local.yaml"))


AWARE = "version: 1\nforwards:\n  svc+x: {target: 'unix:/run/srv/aware.sock', service_descriptor: true}\n"
RAW_FWD = "version: 1\nforwards:\n  svc: {target: 'unix:/run/srv/raw.sock'}\n"
READING_FWD = {"/run/srv/aware.sock"}


@pytest.mark.parametrize("first", ["local", "etc"])
def test_the_other_manifests_qubes_aware_forward_is_pinned(tmp_path: Path, local_by_name: None, first: str) -> None:
    """The /usr/local manifest's forward svc+x reads a descriptor; the /etc manifest's forward
    svc skips it.  Forwards leave no spec: the other manifest's record and configs say which
    links read descriptors (effective.applied_forwards), so whichever applies second pins
    svc+x, and check and list of either manifest see a forgeable disk."""
    local, etc, root = tmp_path / "local.yaml", tmp_path / "etc.yaml", tmp_path / "root"
    local.write_text(AWARE)
    etc.write_text(RAW_FWD)
    for manifest in ((local, etc) if first == "local" else (etc, local)):
        code, output = run("apply", manifest, root)
        assert code == 0, output
    assert not qrexec_view.forgeable(root, READING_FWD, {}), "apply left svc+x forgeable"
    for pin in root.glob("*/**/rpc-config/svc+x"):
        pin.unlink()  # what a disk without the pin looks like
    assert qrexec_view.forgeable(root, READING_FWD, {})
    for manifest in (local, etc):
        for verb in ("check", "list"):
            code, output = run(verb, manifest, root)
            assert code == 1 and "FORGEABLE: calls of svc+x" in output, (manifest, verb, output)


def test_the_other_manifests_daemon_is_known_from_its_spec_whatever_else_is_beside_it(
        tmp_path: Path, local_by_name: None) -> None:
    """A check of one manifest judges the other's applied daemons from their specs on disk
    (effective.applied_daemons): a leftover that is no spec, a spec that cannot be read, or a
    layout with no spec directory at all must not hide the specs after them."""
    local, etc, root = tmp_path / "local.yaml", tmp_path / "etc.yaml", tmp_path / "root"
    local.write_text(RAW)
    etc.write_text(RAW_FWD)  # a forward only: the /etc layout has no spec directory
    for manifest in (local, etc):
        code, output = run("apply", manifest, root)
        assert code == 0, output
    specs = root / "usr/local/var/lib/qubes-socksvc/daemons"
    assert [p.name for p in specs.iterdir()] == ["d.json"] and not (root / "var/lib/qubes-socksvc/daemons").exists()
    (specs / "0-notes.txt").write_text("not a spec\n")
    (specs / "a.json").write_text("{")  # sorted before d.json, and unreadable
    for pin in root.glob("*/**/rpc-config/my.Svc+x"):
        pin.unlink()
    plant(root, "my.Svc+x", "skip-service-descriptor=true\n")
    reading = {"/run/qubes/socksvc-d.sock"}
    assert qrexec_view.forgeable(root, reading, {"qubes-socksvc-d.socket": reading})
    for manifest, named in ((etc, "daemon d (applied, /usr/local/var/lib/qubes-socksvc/daemons/d.json)"),
                            (local, "daemon d")):
        code, output = run("check", manifest, root)
        # The report names the daemon whose socket the call reaches, and the spec it is known by.
        assert code == 1 and f"FORGEABLE: calls of my.Svc+x can reach /usr/local/etc/qubes-rpc/my.Svc+x, " \
            f"the socket of {named}, with" in output, (manifest, output)


def test_a_daemon_whose_spec_is_gone_while_its_socket_unit_stays_still_reads_descriptors(
        tmp_path: Path, local_by_name: None) -> None:
    """An apply killed after removing a daemon's spec leaves its socket unit; the daemon, if it
    runs, goes on serving its last spec (server.Server.reload keeps it when the spec cannot be
    loaded).  The other manifest's apply must keep the pin it wrote for a foreign link to that
    daemon's descriptor socket: dropping it let the caller's stdin be read as the descriptor
    (found by the random run of test_every_instant, seed 112)."""
    local, etc, root = tmp_path / "local.yaml", tmp_path / "etc.yaml", tmp_path / "root"
    local.write_text("version: 1\ndaemons:\n  d2:\n    services:\n      svc:\n"
                     f"{HANDLER}        service_descriptor: false\n        socket: /run/qubes/socksvc-d2-svc.sock\n")
    etc.write_text(f"version: 1\ndaemons:\n  d1:\n    services:\n      other:\n{HANDLER}")
    assert run("apply", local, root)[0] == 0
    foreign = root / "etc/qubes-rpc/svc+f"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.symlink_to("/run/qubes/socksvc-d2.sock")  # the descriptor socket of d2, not ours to judge
    code, output = run("apply", etc, root)
    assert code == 0, output
    pin = root / "etc/qubes/rpc-config/svc+f"
    assert rpcconfig.parse(pin.read_text()).skip_service_descriptor is False
    (root / "usr/local/var/lib/qubes-socksvc/daemons/d2.json").unlink()
    code, output = run("apply", etc, root)
    assert code == 0, output
    d2 = {"/run/qubes/socksvc-d2.sock", "/run/qubes/socksvc-d2-svc.sock"}
    assert not qrexec_view.forgeable(root, {"/run/qubes/socksvc-d2.sock"}, {"qubes-socksvc-d2.socket": d2})
    assert rpcconfig.parse(pin.read_text()).skip_service_descriptor is False
    code, output = run("check", etc, root)
    assert code == 0, output


OWN = "        service_descriptor: false\n        socket: /run/qubes/socksvc-d2-own.sock\n"


@pytest.mark.parametrize("own", ["", OWN], ids=["shared socket", "own socket"])
def test_the_other_manifests_daemon_shadows_ours_while_its_socket_is_down(
        tmp_path: Path, local_by_name: None, own: str) -> None:
    """A link to a daemon's socket (its shared one, or a service's own) comes and goes with its
    sessions: down at apply time (no socket file), it is up at the next login, and then qrexec
    connects to it first (/usr/local before /etc).  apply warns as if it were up."""
    local, etc, root = tmp_path / "local.yaml", tmp_path / "etc.yaml", tmp_path / "root"
    local.write_text(f"version: 1\ndaemons:\n  d2:\n    services:\n      my.Svc:\n{HANDLER}{own}")
    etc.write_text(DAEMON)
    assert run("apply", local, root)[0] == 0
    assert not list((root / "run").glob("**/*.sock"))
    code, output = run("apply", etc, root)
    # Behind a descriptor-less service's link, ours would take its skip-service-descriptor=true
    # (the /usr/local rpc-config, which apply cannot outrank from /etc): refused.
    assert code == (1 if own else 0), output
    assert "calls of my.Svc (and my.Svc+) reach /usr/local/etc/qubes-rpc/my.Svc (a socket service), which qrexec " \
           "finds first" in output, output


@pytest.mark.parametrize("spec", ["there", "gone"])
def test_a_descriptor_less_service_before_its_daemons_shared_socket_is_no_forgery(tmp_path: Path, spec: str) -> None:
    """my.Svc+x on its own socket (service_descriptor: false, skip-service-descriptor=true),
    my.Svc on the daemon's shared socket: a call of my.Svc+x reaches its own socket while the
    unit is up, and while it is down the shared socket is down too (systemd opens and removes
    all of a unit's ListenStream= together), so it never reaches the shared socket with its
    config.  The same with the spec gone (an interrupted apply): the unit file says which
    sockets are one unit's."""
    manifest, root = write(tmp_path, f"version: 1\ndaemons:\n  d:\n    services:\n      my.Svc:\n{HANDLER}"
                           f"      my.Svc+x:\n{HANDLER}        service_descriptor: false\n"
                           "        socket: /run/qubes/socksvc-d-x.sock\n")
    assert run("apply", manifest, root)[0] == 0
    if spec == "gone":
        (root / "var/lib/qubes-socksvc/daemons/d.json").unlink()
    code, output = run("check", manifest, root)
    assert code == 0 and "FORGEABLE" not in output, output
    assert not effective.forgeable(None, str(root))  # the other manifest's check: the disk alone
    sockets = {"/run/qubes/socksvc-d.sock", "/run/qubes/socksvc-d-x.sock"}
    assert not qrexec_view.forgeable(root, {"/run/qubes/socksvc-d.sock"}, {"qubes-socksvc-d.socket": sockets})


def test_a_socket_unit_without_a_listen_line_is_no_socket(tmp_path: Path) -> None:
    """A socket unit named like ours with no ListenStream= (damaged, or someone else's) names
    no socket: check judges the rest of the disk and does not fail on it."""
    manifest, root = applied_beside(tmp_path, "my.Svc+")
    (root / "etc/systemd/user/qubes-socksvc-other.socket").write_text("[Socket]\nAccept=no\n")
    code, output = run("check", manifest, root)
    assert code == 1 and "FORGEABLE: calls of my.Svc (and my.Svc+)" in output, output


@pytest.mark.parametrize("unit", ["other.socket", "qubes-socksvc-other.service", "qubes-socksvc-other.socket.d"])
def test_another_programs_socket_service_that_skips_the_descriptor_is_no_forgery(tmp_path: Path, unit: str) -> None:
    """The Qubes way to serve a raw socket (skip-service-descriptor=true, a link in qubes-rpc)
    is another program's business when its socket is no daemon's of ours: a user socket unit
    not named qubes-socksvc-*.socket names no socket of ours, whatever it listens on."""
    manifest, root = write(tmp_path, DAEMON)
    assert run("apply", manifest, root)[0] == 0
    path = root / "etc/systemd/user" / unit
    if unit.endswith(".d"):
        path.mkdir()
        path = path / "listen.conf"
    path.write_text("[Socket]\nListenStream=/run/other/raw.sock\n")
    (root / "etc/qubes-rpc/other.Raw").symlink_to("/run/other/raw.sock")
    (root / "etc/qubes/rpc-config").mkdir(parents=True, exist_ok=True)
    (root / "etc/qubes/rpc-config/other.Raw").write_text("skip-service-descriptor=true\n")
    code, output = run("check", manifest, root)
    assert code == 0 and "other.Raw" not in output, output


def test_a_spec_that_apply_never_renamed_into_place_is_no_daemon(tmp_path: Path, local_by_name: None) -> None:
    """An apply killed between writing a spec to its temporary name and renaming it leaves a
    whole spec under apply's temporary name: no daemon loads it (server: the spec path is
    NAME.json), so a check must not take its socket as reading descriptors, or a foreign link
    to that path would be a forgery no caller can make (and the only fix a removal)."""
    local, root = tmp_path / "local.yaml", tmp_path / "root"
    local.write_text(RAW)
    assert run("apply", local, root)[0] == 0
    specs = root / "usr/local/var/lib/qubes-socksvc/daemons"
    spec = json.loads((specs / "d.json").read_text())
    spec["daemon"].update(name="ghost", socket="/run/qubes/socksvc-ghost.sock", services={})
    (specs / ".socksvc-0123456789abcdef.tmp").write_text(json.dumps(spec))
    link = root / "etc/qubes-rpc/ghost.Svc"
    link.parent.mkdir(parents=True)
    link.symlink_to("/run/qubes/socksvc-ghost.sock")
    config = root / "etc/qubes/rpc-config/ghost.Svc"
    config.parent.mkdir(parents=True)
    config.write_text("skip-service-descriptor=true\n")
    code, output = run("check", local, root)
    assert code == 0 and "ghost" not in output, output


def test_the_other_manifests_forwards_are_all_judged_when_one_of_their_links_is_gone(
        tmp_path: Path, local_by_name: None) -> None:
    """effective.applied_forwards reads the other manifest's record: a link of it that is gone
    (removed by hand) and a TCP forward are skipped, and the forwards recorded after them still
    read descriptors."""
    local, etc, root = tmp_path / "local.yaml", tmp_path / "etc.yaml", tmp_path / "root"
    local.write_text("version: 1\nforwards:\n  a.Svc+x: {target: 'unix:/run/srv/a.sock', service_descriptor: true}\n"
                     "  a.Tcp: {target: 'tcp:127.0.0.1:22'}\n"
                     "  b.Svc+x: {target: 'unix:/run/srv/b.sock', service_descriptor: true}\n")
    etc.write_text(RAW_FWD)
    for manifest in (local, etc):
        code, output = run("apply", manifest, root)
        assert code == 0, output
    owned = json.loads((root / "usr/local/var/lib/qubes-socksvc/owned.json").read_text())
    links = [p for p in owned["owned"] if "/qubes-rpc/" in p]  # the record's order, which is read
    assert links == ["/usr/local/etc/qubes-rpc/a.Svc+x", "/usr/local/etc/qubes-rpc/a.Tcp",
                     "/usr/local/etc/qubes-rpc/b.Svc+x"], links
    (root / "usr/local/etc/qubes-rpc/a.Svc+x").unlink()
    for pin in root.glob("*/**/rpc-config/b.Svc+x"):
        pin.unlink()
    plant(root, "b.Svc+x", "skip-service-descriptor=true\n")
    code, output = run("check", etc, root)
    assert code == 1 and "FORGEABLE: calls of b.Svc+x can reach /usr/local/etc/qubes-rpc/b.Svc+x, the target " \
        "of /usr/local/etc/qubes-rpc/b.Svc+x (applied, reads a descriptor)" in output, output


def test_one_manifests_unreadable_record_hides_no_forward_of_the_other(tmp_path: Path, local_by_name: None) -> None:
    """effective.applied_forwards goes on past a layout whose record cannot be read (apply and
    check of that manifest report it): the other layout's Qubes-aware forward is still known to
    read descriptors."""
    local, root = tmp_path / "local.yaml", tmp_path / "root"
    local.write_text(AWARE)
    code, output = run("apply", local, root)
    assert code == 0, output
    etc_record = root / "var/lib/qubes-socksvc/owned.json"  # the /etc manifest's, read first
    etc_record.parent.mkdir(parents=True, exist_ok=True)
    etc_record.write_text("{")
    assert effective.applied_forwards(str(root), LAYOUTS, []) == \
        {"/run/srv/aware.sock": "the target of /usr/local/etc/qubes-rpc/svc+x (applied, reads a descriptor)"}


BIG_SKIP = "#\n" * 40000 + "skip-service-descriptor=true\n"  # 80 KiB: qrexec reads it line by line


def test_an_rpc_config_too_large_to_judge_counts_as_skipping(tmp_path: Path) -> None:
    """lookup.read_config reads at most 64 KiB, qrexec any size (libqrexec/toml.c reads line by
    line): a config we cannot read is no proof that qrexec fails the call.  One at NAME level is
    pinned against; one that wins the lookup is a forgeable disk for check and list."""
    manifest, root = write(tmp_path, f"version: 1\ndaemons:\n  d:\n    services:\n      svc+x:\n{HANDLER}")
    (root / "etc/qubes/rpc-config").mkdir(parents=True)
    (root / "etc/qubes/rpc-config/svc").write_text(BIG_SKIP)
    code, output = run("apply", manifest, root)
    assert code == 0, output
    assert rpcconfig.parse((root / "etc/qubes/rpc-config/svc+x").read_text()).skip_service_descriptor is False
    units = {"qubes-socksvc-d.socket": {"/run/qubes/socksvc-d.sock"}}
    assert not qrexec_view.forgeable(root, {"/run/qubes/socksvc-d.sock"}, units)
    (root / "run/qubes/rpc-config").mkdir(parents=True)
    (root / "run/qubes/rpc-config/svc+x").write_text(BIG_SKIP)
    assert qrexec_view.forgeable(root, {"/run/qubes/socksvc-d.sock"}, units)
    for verb in ("check", "list"):
        code, output = run(verb, manifest, root)
        assert code == 1 and "FORGEABLE: calls of svc+x" in output, (verb, output)
    # apply says which file it cannot judge, as a warning: the file is volatile (see above)
    manifest.write_text(manifest.read_text() + "        timeout: 5\n")  # something to apply
    code, output = run("apply", manifest, root)
    assert code == 0 and "warning   svc+x: calls of svc+x take the rpc-config /run/qubes/rpc-config/svc+x, " \
        "which qubes-socksvc cannot judge" in output, output


def test_a_socket_file_in_a_qubes_rpc_directory_is_judged(tmp_path: Path) -> None:
    """exec.c find_qrexec_service connects to a socket found as such (S_ISSOCK after lstat),
    not only through a symlink: a hard link of the daemon's socket is the daemon."""
    import socket

    manifest, root = write(tmp_path, f"version: 1\ndaemons:\n  d:\n    socket: /run/qubes/d.sock\n"
                                     f"    services:\n      svc:\n{HANDLER}")
    assert run("apply", manifest, root)[0] == 0
    (root / "run/qubes").mkdir(parents=True)
    (root / "run/qubes-rpc").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "run/qubes/d.sock"))
        os.link(root / "run/qubes/d.sock", root / "run/qubes-rpc/svc+y")
        (root / "usr/local/etc/qubes/rpc-config").mkdir(parents=True)
        (root / "usr/local/etc/qubes/rpc-config/svc+y").write_text("skip-service-descriptor=true\n")
        units = {"qubes-socksvc-d.socket": {"/run/qubes/d.sock"}}
        assert qrexec_view.forgeable(root, {"/run/qubes/d.sock"}, units)
        for verb in ("check", "list"):
            code, output = run(verb, manifest, root)
            assert code == 1 and "FORGEABLE: calls of svc+y can reach /run/qubes-rpc/svc+y" in output, output
        code, output = run("apply", manifest, root)  # the foreign config wins over any pin in /etc: refused
        assert code == 1 and "conflict  svc+y: FORGEABLE" in output, output
    # A socket file of no daemon of ours (another service's, which reads no descriptor) is where
    # qrexec stops: the call goes to that service, and nothing of ours is forgeable through it.
    (root / "run/qubes-rpc/svc+y").unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(root / "run/qubes-rpc/svc+y"))
        assert not qrexec_view.forgeable(root, {"/run/qubes/d.sock"}, units)
        code, output = run("check", manifest, root)
        assert code == 0 and "FORGEABLE" not in output, output

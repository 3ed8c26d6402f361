# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""apply: plan, idempotence, stale removal, conflicts, dry run, ownership; and list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qubes_socksvc import manifest, render
from qubes_socksvc.layout import File, Layout
from tests.conftest import apply, apply_in_process, run_cli
from tests.test_manifest import GOOD, tree_digest

TWO = GOOD + """\
      demo.Later:
        handler: qubes_socksvc.examples:hello
        wait_for_session: true
  second:
    services:
      second.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_apply_creates_then_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, TWO)
    result = apply(manifest, root)
    assert result.returncode == 0 and "applied 11 changes" in result.stdout
    assert result.stdout.count("create ") == 11
    before = tree_digest(root)
    mtimes = {p: p.lstat().st_mtime_ns for p in root.rglob("*")}
    result = apply(manifest, root)
    assert result.returncode == 0 and result.stdout == f"{manifest}: up to date, nothing to do\n"
    assert tree_digest(root) == before
    assert {p: p.lstat().st_mtime_ns for p in root.rglob("*")} == mtimes  # nothing rewritten


def test_removed_services_and_daemons_are_cleaned_up(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, TWO)
    apply(manifest, root)
    manifest.write_text(GOOD)
    result = apply(manifest, root)
    assert result.returncode == 0, result.stdout
    for gone in ("etc/qubes-rpc/demo.Later", "etc/qubes/rpc-config/demo.Later", "etc/qubes-rpc/second.Raw",
                 "etc/systemd/user/qubes-socksvc-second.socket", "etc/systemd/user/qubes-socksvc-second.service",
                 "var/lib/qubes-socksvc/daemons/second.json"):
        assert f"remove    /{gone}" in result.stdout
        assert not os.path.lexists(root / gone)
    assert (root / "etc/qubes-rpc/demo.Echo").is_symlink()
    owned = json.loads((root / "var/lib/qubes-socksvc/owned.json").read_text())["owned"]
    assert sorted(owned) == ["/etc/qubes-rpc/demo.Echo", "/etc/systemd/user/qubes-socksvc-demo.service",
                             "/etc/systemd/user/qubes-socksvc-demo.socket", "/var/lib/qubes-socksvc/daemons/demo.json"]


def test_changed_manifest_updates_in_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, GOOD)
    apply(manifest, root)
    manifest.write_text(GOOD.replace("demo:\n", "demo:\n    description: Changed\n"))
    result = apply(manifest, root)
    assert result.returncode == 0
    assert "update    /etc/systemd/user/qubes-socksvc-demo.service" in result.stdout
    assert "Description=Changed\n" in (root / "etc/systemd/user/qubes-socksvc-demo.service").read_text()


def test_foreign_executable_service_is_a_conflict(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/qubes-rpc").mkdir(parents=True)
    foreign = root / "etc/qubes-rpc/demo.Later"
    foreign.write_text("#!/bin/sh\necho mine\n")
    foreign.chmod(0o755)
    before = tree_digest(root)
    result = apply(write(tmp_path, TWO), root)
    assert result.returncode == 1
    assert "conflict  /etc/qubes-rpc/demo.Later -> " in result.stdout
    assert "(exists and is not owned by qubes-socksvc; remove it or rename the service)" in result.stdout
    assert "1 conflicts; nothing was changed" in result.stderr
    assert tree_digest(root) == before


@pytest.mark.parametrize(("still_declared", "fix"), [(False, "remove it by hand"), (True, "remove it or restore it")])
def test_owned_file_edited_by_hand_is_a_conflict_not_a_casualty(tmp_path: Path, still_declared: bool,
                                                                 fix: str) -> None:
    """A unit apply wrote and an administrator edited is neither removed (its daemon no longer
    declared) nor overwritten (still declared): each conflict says what to do."""
    root = tmp_path / "root"
    manifest = write(tmp_path, TWO)
    apply(manifest, root)
    unit = root / "etc/systemd/user/qubes-socksvc-second.service"
    unit.write_text(unit.read_text() + "# local change\n")
    manifest.write_text(TWO if still_declared else GOOD)
    before = tree_digest(root)
    result = apply(manifest, root)
    assert result.returncode == 1
    assert f"conflict  /etc/systemd/user/qubes-socksvc-second.service  (changed since qubes-socksvc wrote it; {fix})" \
        in result.stdout, result.stdout
    assert tree_digest(root) == before


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, GOOD)
    apply(manifest, root)
    manifest.write_text(TWO)
    before = tree_digest(root)
    result = apply(manifest, root, "--dry-run")
    assert result.returncode == 0 and "dry run: 8 changes not made" in result.stdout
    # A link's line names where it will point; a file's names nothing more.
    assert "create    /etc/qubes-rpc/demo.Later -> /run/qubes/socksvc-demo.sock\n" in result.stdout, result.stdout
    service_line = next(line for line in result.stdout.splitlines() if ".service" in line)
    assert "-> None" not in result.stdout and " -> " not in service_line
    assert tree_digest(root) == before


def test_missing_artifact_is_recreated(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, GOOD)
    apply(manifest, root)
    (root / "etc/qubes-rpc/demo.Echo").unlink()
    result = apply(manifest, root)
    assert result.returncode == 0 and "create    /etc/qubes-rpc/demo.Echo" in result.stdout
    assert os.readlink(root / "etc/qubes-rpc/demo.Echo") == "/run/qubes/socksvc-demo.sock"


def test_list_reports_artifact_states(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manifest = write(tmp_path, TWO)
    apply(manifest, root)
    (root / "etc/qubes-rpc/demo.Echo").unlink()
    wants = root / "etc/systemd/user/sockets.target.wants"
    wants.mkdir()
    (wants / "qubes-socksvc-demo.socket").symlink_to("../qubes-socksvc-demo.socket")
    result = run_cli("list", "-c", str(manifest), "--root", str(root), check=True)
    assert "daemon demo: qubes-socksvc daemon demo [enabled globally]" in result.stdout
    assert "daemon second: qubes-socksvc daemon second [not enabled]" in result.stdout
    assert "link /etc/qubes-rpc/demo.Echo: missing" in result.stdout
    assert "link /etc/qubes-rpc/demo.Later: ok" in result.stdout
    assert "socket /run/qubes/socksvc-demo.sock: not listening" in result.stdout
    assert run_cli("status", "-c", str(manifest), "--root", str(root)).stdout == result.stdout


def test_the_ownership_record_keeps_the_format_installed_systems_have(tmp_path: Path) -> None:
    """Version 1 is what every installed qubes-socksvc wrote: a new package must write (and so
    read) that format, or an upgrade would orphan every file the old one applied."""
    manifest = write(tmp_path, GOOD)
    root = tmp_path / "root"
    result = apply(manifest, root)
    assert result.returncode == 0, result.stderr
    record = json.loads((root / "var/lib/qubes-socksvc/owned.json").read_text())
    assert record["version"] == 1 and record["owned"]


def test_a_spec_up_to_4_mib_applies_and_reapplies_and_a_larger_one_is_refused(tmp_path: Path) -> None:
    """A daemon reads a spec of at most 4 MiB (model.load).  apply writes one of exactly that
    size, and the next apply finds it unchanged (it was taken for someone else's file above
    1 MiB: every later apply was a conflict); a byte more is refused before any write, naming
    the daemon and the fix."""
    def services(number: int, description: str = "qubes-socksvc daemon big") -> str:
        entries = "".join(f"      my.S{i:06d}:\n        handler: qubes_socksvc.examples:echo\n" for i in range(number))
        return f"version: 1\ndaemons:\n  big:\n    description: {description}\n    services:\n{entries}"

    path = tmp_path / "m.yaml"

    def spec_size(text: str) -> int:
        path.write_text(text)
        loaded = manifest.load(str(path))
        [spec] = [a for a in render.render(loaded, Layout.for_manifest(loaded)) if a.path.endswith("/big.json")]
        assert isinstance(spec, File)
        return len(spec.content.encode())

    one, two = spec_size(services(1)), spec_size(services(2))
    most = ((4 << 20) - one) // (two - one) + 1  # each service adds (two - one) bytes
    padding = (4 << 20) - spec_size(services(most))
    exactly = services(most, "qubes-socksvc daemon big" + "d" * padding)
    path.write_text(exactly)
    root = tmp_path / "root"
    assert apply(path, root).returncode == 0
    assert (root / "var/lib/qubes-socksvc/daemons/big.json").stat().st_size == 4 << 20
    result = apply(path, root)
    assert result.returncode == 0 and "up to date, nothing to do" in result.stdout, result.stdout + result.stderr
    before = tree_digest(root)
    path.write_text(exactly.replace("description: ", "description: d", 1))
    result = apply(path, root)
    assert result.returncode == 1
    assert f"{path}: daemons.big: its spec would be 4194305 bytes, more than a daemon reads (4194304); " \
           f"split its {most} services among more daemons" in result.stderr, result.stderr
    path.write_text(services(most + 1))
    result = apply(path, root)
    assert result.returncode == 1
    assert f"split its {most + 1} services among more daemons" in result.stderr, result.stderr
    assert tree_digest(root) == before


def test_a_deleted_record_is_rebuilt_by_the_next_apply(tmp_path: Path) -> None:
    """Refusals over a broken record say "restore or delete it, then apply again": after a delete,
    apply finds every file as it would write it, takes it as its own again without a conflict, and
    later removes what the manifest drops."""
    manifest = write(tmp_path, TWO)
    root = tmp_path / "root"
    assert apply(manifest, root).returncode == 0
    tree = tree_digest(root)
    record = root / "var/lib/qubes-socksvc/owned.json"
    owned = json.loads(record.read_text())
    record.unlink()
    result = apply(manifest, root)
    assert result.returncode == 0 and "conflict" not in result.stdout, result.stdout + result.stderr
    assert tree_digest(root) == tree and json.loads(record.read_text()) == owned
    manifest.write_text(GOOD)
    result = apply(manifest, root)
    assert result.returncode == 0 and "remove" in result.stdout, result.stdout + result.stderr


def test_an_ownership_record_over_its_cap_is_refused_before_the_first_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is read back up to MAX_STATE_SIZE (load_state): one that apply would write
    larger, while it works (old and new states) or after, is a conflict in the plan, so nothing
    is written; with the cap as large as the record, the same apply goes through."""
    from qubes_socksvc import install

    path = write(tmp_path, GOOD)
    root = tmp_path / "root"
    size = len(install._record({}))  # the record of nothing; the real one is far larger
    monkeypatch.setattr(install, "MAX_STATE_SIZE", size + 200)
    code, output = apply_in_process(path, root)
    assert code == 1, output
    assert "conflict  /var/lib/qubes-socksvc/owned.json" in output
    assert f"more than it reads back ({size + 200})" in output
    assert not root.exists()
    monkeypatch.setattr(install, "MAX_STATE_SIZE", 16 << 20)
    assert apply_in_process(path, root)[0] == 0
    written = (root / "var/lib/qubes-socksvc/owned.json").stat().st_size
    monkeypatch.setattr(install, "MAX_STATE_SIZE", written)  # exactly the cap: read back, up to date
    assert apply_in_process(path, root)[0] == 0

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``apply`` under attack and under faults (issue 6, part 3).

The generator runs as root and writes into /etc.  Every case here applies into
a staging tree (``--root``) next to an "outside" directory standing for the
rest of the system, and checks that a refused apply leaves both byte-for-byte
unchanged, that concurrent applies are serialised, and that an apply killed
(SIGKILL) before any one of its file-system operations leaves every path either
old or new, and a state the next apply repairs to exactly what an undisturbed
apply produces, ownership record included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from operator import methodcaller
from pathlib import Path
from typing import Any

import pytest

from qubes_socksvc import install, render
from qubes_socksvc.layout import Layout
from qubes_socksvc.manifest import load as load_manifest
from tests.conftest import apply, apply_in_process, killed_apply, world_dir

A = """\
version: 1
daemons:
  alpha:
    services:
      alpha.Echo:
        handler: qubes_socksvc.examples:echo
        wait_for_session: true
      alpha.Hello+friend:
        handler: qubes_socksvc.examples:hello
      alpha.Gone:
        handler: qubes_socksvc.examples:hello
        exit_on_client_eof: true
  beta:
    services:
      beta.Raw:
        handler: qubes_socksvc.examples:echo
        service_descriptor: false
"""

# From A: one daemon removed, one service removed, one changed, two added.
B = """\
version: 1
daemons:
  alpha:
    description: Alpha, second edition
    services:
      alpha.Echo:
        handler: qubes_socksvc.examples:echo
      alpha.Hello+friend:
        handler: qubes_socksvc.examples:hello
        wait_for_session: true
      alpha.New:
        handler: qubes_socksvc.examples:sha256
  gamma:
    services:
      gamma.Upper:
        handler: qubes_socksvc.examples:upper
"""

RPC = "etc/qubes-rpc"
RECORD = "var/lib/qubes-socksvc/owned.json"

Snapshot = dict[str, tuple[str, ...]]


def snapshot(*roots: Path) -> Snapshot:
    """Every path below the roots: type, mode, content digest or link target."""
    result: Snapshot = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                st = path.lstat()
                key = str(path)
                if path.is_symlink():
                    result[key] = ("link", os.readlink(path))
                elif path.is_file():
                    result[key] = ("file", oct(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
                else:
                    result[key] = ("dir", oct(st.st_mode))
    return result


def relative(snap: Snapshot, root: Path) -> Snapshot:
    return {os.path.relpath(k, root): v for k, v in snap.items()}


@pytest.fixture
def world(tmp_path: Path) -> Callable[[str], tuple[Path, Path, Path]]:
    """world(text) -> (manifest holding text, staging root, outside dir with a victim file).

    One manifest path per test: rendered units name the manifest they come from."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "victim").write_text("precious\n")

    def make(text: str) -> tuple[Path, Path, Path]:
        manifest = tmp_path / "m.yaml"
        manifest.write_text(text)
        return manifest, tmp_path / "root", outside

    return make


def reference(manifest: Path, *texts: str) -> tuple[Snapshot, Path]:
    """The tree (relative snapshot, root) undisturbed applies of ``texts`` produce, in a fresh root."""
    saved = manifest.read_text()
    root = manifest.parent / f"reference-{hashlib.sha256(repr(texts).encode()).hexdigest()[:12]}"
    if not root.exists():
        try:
            for text in texts:
                manifest.write_text(text)
                assert apply(manifest, root).returncode == 0
        finally:
            manifest.write_text(saved)
    return relative(snapshot(root), root), root


def assert_refused(result: subprocess.CompletedProcess[str], before: Snapshot, *roots: Path, words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert words in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert snapshot(*roots) == before, "a refused apply changed the file system"


# --- manifests that would write elsewhere ---------------------------------------------------

@pytest.mark.parametrize("service, daemon, socket", [
    ("../../outside/victim", "d", None),
    ("a/../../../outside/victim", "d", None),
    ("/etc/passwd", "d", None),
    ("..", "d", None),
    ("a.B+../x", "d", None),
    ("a.B", "../outside", None),
    ("a.B", "d/e", None),
    ("a.B", "d", "/run/qubes/../../outside/x.sock"),
    ("a.B", "d", "/outside/x.sock"),
    ("a.B", "d", "/run/qubes/x/../y.sock"),
])
def test_manifest_naming_paths_elsewhere_writes_nothing(
        world: Callable[[str], tuple[Path, Path, Path]], service: str, daemon: str, socket: str | None) -> None:
    text = f"version: 1\ndaemons:\n  '{daemon}':\n"
    if socket is not None:
        text += f"    socket: '{socket}'\n"
    text += f"    services:\n      '{service}':\n        handler: qubes_socksvc.examples:echo\n"
    manifest, root, outside = world(text)
    root.mkdir()
    before = snapshot(root, outside)
    assert_refused(apply(manifest, root), before, root, outside, words=":")
    assert not any(root.iterdir())


# --- what is already there and not ours --------------------------------------------------------

def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def plant(root: Path, relpath: str, how: Callable[[Path], object]) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    how(path)


PLANTS: dict[str, tuple[str, Callable[[Path, Path], object], str]] = {
    # name: (where, how(path, outside), words expected in the refusal)
    "foreign executable service": (f"{RPC}/alpha.Echo", lambda p, o: write_executable(p, "#!/bin/sh\n"),
                                   "not owned"),
    "foreign rpc-config": ("etc/qubes/rpc-config/alpha.Echo", lambda p, o: p.write_text("wait-for-session=false\n"),
                           "not owned"),
    "foreign unit": ("etc/systemd/user/qubes-socksvc-alpha.service", lambda p, o: p.write_text("[Service]\n"),
                     "not owned"),
    "dangling symlink": (f"{RPC}/alpha.Echo", lambda p, o: p.symlink_to("/run/qubes/nobody-listens.sock"),
                         "not owned"),
    "foreign symlink to a file": (f"{RPC}/alpha.Echo", lambda p, o: p.symlink_to(o / "victim"), "not owned"),
    "symlink to the right socket, not ours": (f"{RPC}/alpha.Echo",
                                              lambda p, o: p.symlink_to("/run/qubes/other.sock"), "not owned"),
    "symlink to a directory": (f"{RPC}/alpha.Echo", lambda p, o: p.symlink_to(o), "not owned"),
    "directory": (f"{RPC}/alpha.Echo", lambda p, o: p.mkdir(), "not owned"),
    "fifo": (f"{RPC}/alpha.Echo", lambda p, o: os.mkfifo(p), "not owned"),
    "symlinked qubes-rpc directory": (RPC, lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked rpc-config directory": ("etc/qubes/rpc-config", lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked /etc/qubes": ("etc/qubes", lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked unit directory": ("etc/systemd/user", lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked /etc": ("etc", lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked record directory": ("var/lib/qubes-socksvc", lambda p, o: p.symlink_to(o), "is a symlink"),
    "symlinked /var": ("var", lambda p, o: p.symlink_to(o), "is a symlink"),
    "dangling symlinked qubes-rpc directory": (RPC, lambda p, o: p.symlink_to(o / "missing"), "is a symlink"),
}


@pytest.mark.parametrize("case", ["symlinked qubes-rpc directory", "foreign executable service", "dangling symlink",
                                  "symlinked record directory"])
def test_planted_paths_after_a_first_apply_are_refused(
        world: Callable[[str], tuple[Path, Path, Path]], case: str) -> None:
    """The same attacks against a tree apply already manages (the B update would touch them)."""
    where, how, _ = PLANTS[case]
    manifest_a, root, outside = world(A)
    assert apply(manifest_a, root).returncode == 0
    target = root / where
    if target.is_dir() and not target.is_symlink():
        os.rename(target, outside / "moved-away")
    elif target.exists() or target.is_symlink():
        target.unlink()
    plant(root, where, lambda p: how(p, outside))
    manifest_a.write_text(B)
    before = snapshot(root, outside)
    assert_refused(apply(manifest_a, root), before, root, outside, words="conflict")


def test_edited_ownership_record_cannot_point_outside(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """A record naming paths outside the layout's directories (``..``, other directories) is
    never acted on, even when the content there matches the recorded digest."""
    manifest, root, outside = world(A)
    assert apply(manifest, root).returncode == 0
    record_path = root / RECORD
    record = json.loads(record_path.read_text())
    victim_digest = hashlib.sha256((outside / "victim").read_bytes()).hexdigest()
    depth = len(root.parts) + 2
    escape = "/etc/qubes-rpc/" + "../" * depth + str(outside / "victim").lstrip("/")
    record["owned"][escape] = [victim_digest]
    record["owned"]["/etc/passwd"] = [hashlib.sha256(b"").hexdigest()]
    plant(root, "etc/passwd", lambda p: p.write_text(""))
    record_path.write_text(json.dumps(record))
    before = snapshot(root, outside)
    result = apply(manifest, root)
    assert (outside / "victim").read_text() == "precious\n"
    assert (root / "etc/passwd").exists()
    assert_refused(result, before, root, outside, words="ownership record")
    for path in ("/etc/passwd", escape):  # each of them, not just the first
        assert f"conflict  {path}  (the ownership record names a path qubes-socksvc never writes" in result.stdout


@pytest.mark.parametrize("path", ["/etc/qubes-rpc/sub/x", "/etc/qubes-rpcX/y", "/etc/qubes-rpc/./x",
                                  "/etc/qubes-rpc/", "/etc/qubes-rpc/" + "x" * 256])
def test_edited_ownership_record_names_only_files_directly_in_the_layout(
        world: Callable[[str], tuple[Path, Path, Path]], path: str) -> None:
    """install._in_layout: a recorded path is trusted only as a file directly inside one of the
    layout's directories, spelled plainly: not in a subdirectory, not in a directory whose name
    merely starts like one (/etc/qubes-rpcX), not through '.', not a name longer than NAME_MAX
    (was: "[Errno 36] File name too long")."""
    manifest, root, outside = world(A)
    assert apply(manifest, root).returncode == 0
    record_path = root / RECORD
    record = json.loads(record_path.read_text())
    record["owned"][path] = [hashlib.sha256(b"").hexdigest()]
    too_long = len(os.path.basename(path)) > 255  # no file can have that name
    if not path.endswith("/") and not too_long:
        plant(root, path.lstrip("/"), lambda p: p.write_text(""))
    record_path.write_text(json.dumps(record))
    before = snapshot(root, outside)
    result = apply(manifest, root)
    assert too_long or (root / path.lstrip("/")).exists()
    assert_refused(result, before, root, outside, words="ownership record")


def test_a_recorded_name_of_255_bytes_is_ours(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """NAME_MAX itself is a name apply may write: a recorded file of that name, unchanged since,
    is removed once the manifest no longer declares it."""
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    record = json.loads((root / RECORD).read_text())
    longest = f"{RPC}/" + "x" * 255
    record["owned"]["/" + longest] = [hashlib.sha256(b"").hexdigest()]
    (root / RECORD).write_text(json.dumps(record))
    (root / longest).write_text("")
    result = apply(manifest, root)
    assert result.returncode == 0 and f"remove    /{longest}" in result.stdout, result.stdout + result.stderr
    assert not (root / longest).exists()


def test_unreadable_or_foreign_record_is_refused(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    manifest, root, outside = world(A)
    for text in ("not json", "[]", '{"owned": 3}', '{"owned": {"/etc/qubes-rpc/x": 5}}'):
        plant(root, RECORD, methodcaller("write_text", text))
        before = snapshot(root, outside)
        result = apply(manifest, root)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (text, result.stderr)
        assert snapshot(root, outside) == before


# --- concurrency ---------------------------------------------------------------------------

def test_apply_waits_for_the_lock(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    manifest, root, outside = world(A)
    root.mkdir()
    before = snapshot(root, outside)
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parent.parent}"}
    with install.locked():
        proc = subprocess.Popen([sys.executable, "-m", "qubes_socksvc", "apply", "-c", str(manifest),
                                 "--root", str(root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.5)
            assert proc.poll() is None, "apply did not wait for the lock"
            assert snapshot(root, outside) == before, "apply wrote while another held the lock"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert apply(manifest, root).stdout.endswith("up to date, nothing to do\n")


def test_concurrent_applies_are_serialised(world: Callable[[str], tuple[Path, Path, Path]], tmp_path: Path) -> None:
    """Eight applies of two manifests race on one tree: all succeed (no interleaving makes a
    conflict), the tree ends exactly as one of them left it, and the next apply converges.
    (Two manifest files here, so each rendering names its own.)"""
    manifest_a, root, _ = world(A)
    manifest_b = tmp_path / "b" / "m.yaml"
    manifest_b.parent.mkdir()
    manifest_b.write_text(B)
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).resolve().parent.parent}"}
    procs = [subprocess.Popen([sys.executable, "-m", "qubes_socksvc", "apply", "-c", str(m), "--root", str(root)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in [manifest_a, manifest_b] * 4]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    final = relative(snapshot(root), root)
    ref_a, ref_b = reference(manifest_a, A)[0], reference(manifest_b, B)[0]
    # The record differs with the history; the artifacts must be exactly one manifest's.
    assert artifact_states(final) in (artifact_states(ref_a), artifact_states(ref_b)), "a mixed tree"
    assert apply(manifest_a, root).returncode == 0
    assert artifact_states(relative(snapshot(root), root)) == artifact_states(ref_a)
    assert not [p for p in final if install.TEMP_RE.match(os.path.basename(p))]


# --- crashes -------------------------------------------------------------------------------

def crash_apply(manifest: Path, root: Path, k: int) -> bool:
    """Apply, SIGKILLed just before its k-th file-system operation (conftest.killed_apply).
    True if the child was killed, False if apply finished with fewer operations."""
    code = killed_apply(manifest, root, k)
    assert code in (None, 0), f"apply failed with {code} (not a crash)"
    return code is None


def artifact_states(snap: Snapshot) -> dict[str, tuple[str, ...]]:
    """The artifact paths of a relative snapshot (no directories, no temporary files, no record)."""
    return {k: v for k, v in snap.items()
            if v[0] != "dir" and not install.TEMP_RE.match(os.path.basename(k)) and k != RECORD}


def record(root: Path) -> dict[str, list[str]]:
    owned: dict[str, list[str]] = json.loads((root / RECORD).read_text())["owned"]
    return owned


@pytest.mark.parametrize("history, target", [((), A), ((A,), B), ((B,), A)], ids=["fresh", "A-to-B", "B-to-A"])
def test_crash_at_every_point_is_repaired_by_the_next_apply(
        world: Callable[[str], tuple[Path, Path, Path]], tmp_path: Path,
        history: tuple[str, ...], target: str) -> None:
    manifest = world(target)[0]
    start = tmp_path / "start"
    if history:
        _, start_root = reference(manifest, *history)
        subprocess.run(["cp", "-a", str(start_root), str(start)], check=True)
    start.mkdir(exist_ok=True)
    old = artifact_states(relative(snapshot(start), start))
    expected, expected_root = reference(manifest, *history, target)
    expected_record = record(expected_root)
    new = artifact_states(expected)

    crashes = 0
    for k in range(1, 500):
        root = tmp_path / f"crash{k}"
        subprocess.run(["cp", "-a", str(start), str(root)], check=True)
        if not crash_apply(manifest, root, k):
            break
        crashes += 1
        # Atomic per path: every artifact is entirely old or entirely new.
        now = artifact_states(relative(snapshot(root), root))
        for path in set(old) | set(new) | set(now):
            assert now.get(path) in (old.get(path), new.get(path)), f"crash at {k}: {path} is half-written"
        code, output = apply_in_process(manifest, root)
        assert code == 0, f"crash at {k}: the next apply failed:\n{output}"
        assert relative(snapshot(root), root) == expected, f"crash at {k}: not repaired:\n{output}"
        assert record(root) == expected_record, f"crash at {k}: the ownership record was not narrowed"
        code, output = apply_in_process(manifest, root)
        assert code == 0 and output.endswith("up to date, nothing to do\n"), output
        subprocess.run(["rm", "-rf", str(root)], check=True)
    else:
        pytest.fail("apply never finished: crash points not counted")
    assert crashes >= 10, f"only {crashes} crash points: the injection does not reach apply's writes"


@contextlib.contextmanager
def failing_rename(after: int) -> Iterator[None]:
    """os.rename raises (as on EIO or a full disk) after ``after`` successful calls."""
    real = os.rename
    calls = 0

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > after:
            raise OSError(5, "Input/output error (injected)")
        real(src, dst, *args, **kwargs)

    os.rename = rename
    try:
        yield
    finally:
        os.rename = real


@pytest.mark.parametrize("after", [0, 1, 3, 6])
def test_io_error_mid_apply_is_reported_and_repaired(
        world: Callable[[str], tuple[Path, Path, Path]], tmp_path: Path, after: int) -> None:
    manifest, root, _ = world(A)
    with failing_rename(after):
        code, output = apply_in_process(manifest, root)
    assert code == 1 and "Input/output error (injected)" in output and "Traceback" not in output, output
    code, output = apply_in_process(manifest, root)
    assert code == 0, output
    assert relative(snapshot(root), root) == reference(manifest, A)[0]


def test_interrupted_apply_leaves_no_claim_on_paths_it_gave_up(
        world: Callable[[str], tuple[Path, Path, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: an apply that died after its last write but before narrowing the record left
    the record wide, and the next apply ("up to date") never narrowed it: the record still
    claimed alpha.Gone, which B removed, so a package's executable service installed there
    later was a conflict, and every apply of B failed from then on."""
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    manifest.write_text(B)
    real_save = install._save_state
    saves = 0

    def dies_at_the_second_save(*args: Any) -> None:
        nonlocal saves
        saves += 1
        if saves == 2:
            raise KeyboardInterrupt  # killed before the record is narrowed
        real_save(*args)

    monkeypatch.setattr(install, "_save_state", dies_at_the_second_save)
    code, output = apply_in_process(manifest, root)
    assert code == 130 and "interrupted" in output, output  # Ctrl-C: the shell's 130, no traceback
    monkeypatch.setattr(install, "_save_state", real_save)
    assert "/etc/qubes-rpc/alpha.Gone" in record(root)
    code, output = apply_in_process(manifest, root)
    assert code == 0 and output.endswith("up to date, nothing to do\n"), output
    assert "/etc/qubes-rpc/alpha.Gone" not in record(root)
    plant(root, f"{RPC}/alpha.Gone", lambda p: write_executable(p, "#!/bin/sh\necho packaged\n"))
    code, output = apply_in_process(manifest, root)
    assert code == 0, output
    assert (root / RPC / "alpha.Gone").read_text() == "#!/bin/sh\necho packaged\n"


def test_short_writes_never_install_a_truncated_file(
        world: Callable[[str], tuple[Path, Path, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """write() may take fewer bytes than asked (a nearly full disk, a signal): every file apply
    renames into place must still be complete."""
    manifest, root, _ = world(A)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:100])))
    code, output = apply_in_process(manifest, root)
    monkeypatch.setattr(os, "write", real_write)
    assert code == 0, output
    assert relative(snapshot(root), root) == reference(manifest, A)[0]


# --- an apply that cannot half-happen (issue 10) --------------------------------------------

def long_name_manifest(length: int) -> str:
    """A service NAME of ``length`` bytes (qrexec allows up to NAME_MAX, 255), with an rpc-config."""
    name = "long." + "x" * (length - 5)
    return A + f"""\
  long:
    services:
      {name}:
        handler: qubes_socksvc.examples:echo
        wait_for_session: true
"""


@pytest.mark.parametrize("length", [250, 255])
def test_longest_service_name_applies_whole(world: Callable[[str], tuple[Path, Path, Path]], length: int) -> None:
    """Was: the temporary name ``.NAME.socksvc-tmp`` passed NAME_MAX, and apply failed after
    writing the record and part of the tree."""
    manifest, root, _ = world(long_name_manifest(length))
    result = apply(manifest, root)
    assert result.returncode == 0, result.stdout + result.stderr
    name = "long." + "x" * (length - 5)
    assert os.readlink(root / RPC / name) == "/run/qubes/socksvc-long.sock"
    assert (root / "etc/qubes/rpc-config" / name).read_text().endswith("wait-for-session=true\n")
    assert f"/{RPC}/{name}" in record(root)
    assert not [p for p in snapshot(root) if install.TEMP_RE.match(os.path.basename(p))]
    assert apply(manifest, root).stdout.endswith("up to date, nothing to do\n")


def test_temporary_names_have_a_fixed_length() -> None:
    for name in ("a", "x" * 255):
        temp = os.path.basename(install._temp_for(f"/etc/qubes-rpc/{name}"))
        assert install.TEMP_RE.match(temp) and len(temp) == 29


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i: even root cannot write there (the case of a read-only file system too)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


IN_THE_WAY: dict[str, tuple[str, Callable[[Path, Path], object], str]] = {
    # name: (where, how(path, outside), words expected in the refusal)
    "a file instead of the qubes-rpc directory": (RPC, lambda p, _: p.write_text("x"), "is not a directory"),
    "a file instead of /etc/qubes": ("etc/qubes", lambda p, _: p.write_text("x"), "is not a directory"),
    "a file instead of the unit directory's parent": ("etc/systemd", lambda p, _: p.write_text("x"),
                                                      "is not a directory"),
    "a file instead of the record's directory": ("var/lib/qubes-socksvc", lambda p, _: p.write_text("x"),
                                                 "is not a directory"),
    "a directory named like our temporary file": (
        f"{RPC}/{os.path.basename(install._temp_for('/etc/qubes-rpc/alpha.Echo'))}", lambda p, _: p.mkdir(),
        "is in the way"),
    "a directory named like the record's temporary file": (
        f"var/lib/qubes-socksvc/{os.path.basename(install._temp_for(RECORD))}", lambda p, _: p.mkdir(),
        "is in the way"),
    "a FIFO named like a unit's temporary file": (
        f"etc/systemd/user/{os.path.basename(install._temp_for('/etc/systemd/user/qubes-socksvc-beta.socket'))}",
        lambda p, _: os.mkfifo(p), "is in the way"),
}


@pytest.mark.parametrize("case", [*sorted(PLANTS), *sorted(IN_THE_WAY)])
def test_planted_or_in_the_way_paths_are_refused_before_the_first_write(
        world: Callable[[str], tuple[Path, Path, Path]], case: str) -> None:
    """An attack planted in the tree (PLANTS), or what would fail mid-way (IN_THE_WAY): apply and
    apply --dry-run refuse it, name every artifact below it, and change nothing."""
    where, how, words = {**PLANTS, **IN_THE_WAY}[case]
    manifest, root, outside = world(A)
    root.mkdir()
    plant(root, where, lambda p: how(p, outside))
    before = snapshot(root, outside)
    result = apply(manifest, root)
    assert_refused(result, before, root, outside, words=words)
    assert_refused(apply(manifest, root, "--dry-run"), before, root, outside, words=words)
    below = [path for path, (kind, *_) in reference(manifest, A)[0].items()
             if kind != "dir" and path.startswith(f"{where}/")]
    for path in below:  # every artifact in a directory that cannot be written is named
        assert f"conflict  /{path}" in result.stdout, result.stdout


def test_a_root_that_is_a_file_is_refused(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    manifest, root, _ = world(A)
    root.write_text("not a tree\n")
    before = snapshot(root.parent)
    assert_refused(apply(manifest, root), before, root.parent, words="is not a directory")


@pytest.mark.parametrize("where", ["etc/systemd/user", RPC, "var/lib/qubes-socksvc",
                                   "etc/systemd/user/qubes-socksvc-alpha.service"])
def test_an_unwritable_directory_or_file_is_refused_before_the_first_write(
        world: Callable[[str], tuple[Path, Path, Path]], where: str) -> None:
    """Was: the record and the qubes-rpc links were written, then the unit write failed (EPERM)."""
    manifest, root, outside = world(A)
    assert apply(manifest, root).returncode == 0
    manifest.write_text(B)
    before = snapshot(root, outside)
    with immutable(root / where):
        result = apply(manifest, root)
        # as root, only a read-only file system or chattr +i can refuse a write
        assert_refused(result, before, root, outside, words=f"{root / where} is not writable (a read-only file "
                       "system, or an immutable directory)" if "." not in where else "cannot be replaced")
    assert apply(manifest, root).returncode == 0
    assert relative(snapshot(root), root) == reference(manifest, A, B)[0]



def test_an_apply_with_nothing_to_change_needs_no_writable_directory(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """An apply that changes nothing writes nothing, the record included: an immutable record
    directory (or a read-only /var) does not fail it."""
    manifest, root, outside = world(A)
    assert apply(manifest, root).returncode == 0
    before = snapshot(root, outside)
    with immutable(root / "var/lib/qubes-socksvc"):
        result = apply(manifest, root)
    assert result.returncode == 0 and "conflict" not in result.stdout, result.stdout + result.stderr
    assert snapshot(root, outside) == before


def test_a_path_longer_than_path_max_is_refused_before_the_first_write(tmp_path: Path) -> None:
    """A root of 4046 bytes: the record and the qubes-rpc links fitted PATH_MAX under the
    old temporary names and the units did not, so apply failed half-way (ENAMETOOLONG)."""
    deep = tmp_path
    while len(str(deep)) < 4044:
        deep = deep / ("d" * min(200, 4044 - len(str(deep)) - 1))
    deep.mkdir(parents=True)
    root = deep / "r"
    assert len(str(root)) == 4046
    manifest = tmp_path / "m.yaml"
    manifest.write_text(A)
    before = snapshot(tmp_path)
    assert_refused(apply(manifest, root), before, tmp_path, words="PATH_MAX")


def test_paths_of_exactly_4095_bytes_are_written_and_one_more_is_refused(tmp_path: Path) -> None:
    """Linux takes a path of at most 4095 bytes (its PATH_MAX, 4096, counts the NUL): apply writes
    a tree whose longest path, or the temporary name it is written through, is exactly that long,
    and refuses a root one byte longer before its first write."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(A)
    short = tmp_path / "short"
    assert apply(manifest, short).returncode == 0
    temp_name = len("/.socksvc-0123456789abcdef.tmp")  # install._temp_for: fixed length
    beyond_root = max(max(len(os.fsencode(rel)), len(os.fsencode(os.path.dirname(rel))) + temp_name)
                      for rel, (kind, *_) in relative(snapshot(short), short).items() if kind != "dir") + 1
    fits = deep_path(tmp_path / "fits", 4095 - beyond_root)
    result = apply(manifest, fits)
    assert result.returncode == 0, result.stdout + result.stderr
    assert relative(snapshot(fits), fits) == relative(snapshot(short), short)
    too_long = deep_path(tmp_path / "long", 4096 - beyond_root)
    assert_refused(apply(manifest, too_long), snapshot(tmp_path / "long"), tmp_path / "long", words="PATH_MAX")


def deep_path(base: Path, length: int) -> Path:
    """A path of exactly ``length`` bytes below ``base``, its parent directory made."""
    parent = base
    while length - len(str(parent)) > 256:  # NAME_MAX: 255 bytes a component
        parent = parent / ("d" * 200)
    parent.mkdir(parents=True)
    path = parent / ("r" * (length - len(str(parent)) - 1))
    assert len(str(path)) == length
    return path


def test_a_leftover_in_a_directory_apply_cannot_write_is_left_alone(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """An interrupted apply's temporary file in a directory made immutable since: apply cannot
    sweep it, so it leaves it, and with nothing else to change it succeeds."""
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    leftover = root / RPC / ".socksvc-0123456789abcdef.tmp"
    leftover.write_text("half a file")
    with immutable(root / RPC):
        result = apply(manifest, root)
        assert result.returncode == 0 and "up to date" in result.stdout, result.stdout + result.stderr
    assert leftover.exists()


@pytest.fixture
def applied_for_nobody() -> Iterator[tuple[Path, Path]]:
    """(manifest, root): A applied by root in a directory "nobody" can reach, for a user's dry run."""
    top = world_dir("socksvc-nobody-")
    manifest, root = top / "m.yaml", top / "root"
    manifest.write_text(A)
    manifest.chmod(0o644)
    assert apply(manifest, root).returncode == 0
    yield manifest, root
    shutil.rmtree(top)


def test_a_directory_the_user_cannot_list_hides_no_leftover_elsewhere(applied_for_nobody: tuple[Path, Path]) -> None:
    """A user's dry run over the user's own tree: a directory it may write and search but not
    list (mode 0300) has leftovers nobody can see; those of the next directories are still listed."""
    manifest, root = applied_for_nobody
    nobody = pwd.getpwnam("nobody").pw_uid
    for dirpath, _, names in os.walk(root):
        for name in ["", *names]:
            os.chown(os.path.join(dirpath, name), nobody, -1, follow_symlinks=False)
    (root / "etc/qubes/rpc-config/.socksvc-0123456789abcdef.tmp").write_text("half a file")
    (root / RPC).chmod(0o300)
    result = run_as_nobody("apply", "-c", str(manifest), "--root", str(root), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sweep     /etc/qubes/rpc-config/.socksvc-0123456789abcdef.tmp" in result.stdout, result.stdout


def test_a_refused_apply_leaves_leftovers_alone_and_a_dry_run_only_lists_them(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    manifest, root, outside = world(A)
    assert apply(manifest, root).returncode == 0
    leftover = root / RPC / ".socksvc-0123456789abcdef.tmp"
    leftover.write_text("half a file")
    result = apply(manifest, root, "--dry-run")
    assert result.returncode == 0 and "sweep     /etc/qubes-rpc/.socksvc-0123456789abcdef.tmp" in result.stdout
    assert "dry run: 1 changes not made" in result.stdout
    assert leftover.exists()
    plant(root, f"{RPC}/alpha.New", lambda p: p.write_text("#!/bin/sh\n"))  # B would conflict here
    manifest.write_text(B)
    before = snapshot(root, outside)
    assert_refused(apply(manifest, root), before, root, outside, words="not owned")


def test_leftovers_in_every_directory_are_swept_and_nothing_else(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    expected = relative(snapshot(root), root)
    ours, theirs = [], []
    for directory in ("etc/systemd/user", RPC, "etc/qubes/rpc-config", "var/lib/qubes-socksvc"):
        ours += [root / directory / ".socksvc-0123456789abcdef.tmp",  # a file cut short by a kill
                 root / directory / ".alpha.Echo.socksvc-tmp"]  # an earlier version's temporary name
        (root / directory / ".socksvc-fedcba9876543210.tmp").symlink_to("/run/qubes/socksvc-alpha.sock")
        ours.append(root / directory / ".socksvc-fedcba9876543210.tmp")
        theirs += [root / directory / ".socksvc-notours.tmp", root / directory / "alpha.socksvc-tmp.bak",
                   root / directory / ".socksvc-0123456789abcdef.tmp\n",  # not our names: they end in .tmp
                   root / directory / ".alpha.Echo.socksvc-tmp\n",
                   # 16 characters, one of them no hex digit: qubes-rpc names may hold + @ :
                   *(root / directory / f".socksvc-{c}123456789abcdef.tmp" for c in "+@:")]
    for path in ours[:] + theirs:
        if not path.is_symlink():
            path.write_text("x")
    (root / RPC / ".socksvc-aaaaaaaaaaaaaaaa.tmp").mkdir()  # a directory is never swept
    theirs.append(root / RPC / ".socksvc-aaaaaaaaaaaaaaaa.tmp")
    result = apply(manifest, root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("sweep ") == len(ours) and "up to date, 12 leftovers swept" in result.stdout
    assert not [p for p in ours if os.path.lexists(p)]
    assert all(p.exists() for p in theirs)
    for p in theirs:
        p.rmdir() if p.is_dir() else p.unlink()
    assert relative(snapshot(root), root) == expected


@contextlib.contextmanager
def enospc_after(calls: int) -> Iterator[list[int]]:
    """os.write writes half of what it is given, and fails with ENOSPC from the ``calls``-th call on.
    Yields the list of file descriptors a write failed on."""
    real = os.write
    count = 0
    failed: list[int] = []

    def write(fd: int, data: Any) -> int:
        nonlocal count
        count += 1
        if count >= calls:
            failed.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data[:max(1, len(data) // 2)]))

    os.write = write
    try:
        yield failed
    finally:
        os.write = real


@pytest.mark.parametrize("calls", [1, 2, 3, 5, 8, 13])
def test_a_full_disk_leaves_no_partial_file_and_the_next_apply_repairs(
        world: Callable[[str], tuple[Path, Path, Path]], calls: int) -> None:
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    old = artifact_states(relative(snapshot(root), root))
    manifest.write_text(B)
    new = artifact_states(reference(manifest, A, B)[0])
    with enospc_after(calls) as failed:
        code, output = apply_in_process(manifest, root)
    assert failed, "ENOSPC was never injected"
    assert code == 1 and "No space left on device" in output and "Traceback" not in output, output
    now = relative(snapshot(root), root)
    assert not [p for p in now if install.TEMP_RE.match(os.path.basename(p))], "a partial temporary file stayed"
    for path, state in artifact_states(now).items():
        assert state in (old.get(path), new.get(path)), f"{path} is half-written"
    code, output = apply_in_process(manifest, root)
    assert code == 0, output
    assert relative(snapshot(root), root) == reference(manifest, A, B)[0]


def test_a_crash_at_every_point_is_swept_even_when_the_next_manifest_differs(
        world: Callable[[str], tuple[Path, Path, Path]], tmp_path: Path) -> None:
    """Killed while applying B over A, then A is applied again: B's new paths are never written
    again, so only the sweep removes their temporary files."""
    manifest = world(B)[0]
    _, start = reference(manifest, A)
    expected = reference(manifest, A)[0]
    crashes = 0
    for k in range(1, 500):
        root = tmp_path / f"crash{k}"
        subprocess.run(["cp", "-a", str(start), str(root)], check=True)
        manifest.write_text(B)
        if not crash_apply(manifest, root, k):
            break
        crashes += 1
        manifest.write_text(A)
        code, output = apply_in_process(manifest, root)
        assert code == 0, f"crash at {k}: the next apply failed:\n{output}"
        assert relative(snapshot(root), root) == expected, f"crash at {k}: leftovers:\n{output}"
        subprocess.run(["rm", "-rf", str(root)], check=True)
    assert crashes >= 10


def test_repeated_interrupted_applies_never_grow_the_record(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """Was: every interrupted apply appended its fingerprints again ([a, b, b, b, ...])."""
    manifest, root, _ = world(A)
    assert apply(manifest, root).returncode == 0
    for round_, k in enumerate([2, 2, 2, 5, 9, 3, 7, 2, 11, 4]):
        manifest.write_text(B if round_ % 3 else A)
        crash_apply(manifest, root, k)
        for path, states in record(root).items():
            assert len(states) == len(set(states)) <= 2, f"round {round_}: {path}: {states}"
    manifest.write_text(B)
    assert apply_in_process(manifest, root)[0] == 0
    assert relative(snapshot(root), root) == reference(manifest, A, B)[0]


def test_modes_are_explicit_whatever_the_umask(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """Was: under umask 077 the unit directory was 0700, unreadable by every user manager."""
    manifest, root, _ = world(A)
    old = os.umask(0o077)
    try:
        result = apply(manifest, root)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stdout + result.stderr
    for path, state in relative(snapshot(root), root).items():
        if state[0] == "dir":
            assert state[1] == oct(0o40755), path
        elif state[0] == "file":
            assert state[1] == oct(0o100644), path
    assert oct(root.stat().st_mode) == oct(0o40755)


def test_the_lock_lives_where_only_root_creates_files() -> None:
    """/run/lock is world-writable: any user could create and hold the lock, and hang postinst."""
    lock = Path(install.LOCK_FILE)
    for directory in lock.parents:
        st = directory.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, f"{directory} is writable by others"
    with install.locked():
        st = lock.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0


def test_the_lock_is_never_taken_through_a_symlink(tmp_path: Path) -> None:
    """Were its directory ever writable by someone else, a symlink planted as the lock must not make
    apply create or lock a file of the attacker's choosing (install.locked: O_NOFOLLOW)."""
    lock, victim = tmp_path / "apply.lock", tmp_path / "victim"
    lock.symlink_to(victim)
    with pytest.raises(install.ApplyError, match="cannot take the apply lock"), install.locked(str(lock)):
        pass
    assert not victim.exists()


def test_the_lock_is_made_on_first_use_held_exclusively_and_never_inherited(tmp_path: Path) -> None:
    """The lock file is created the first time (mode 0600, whatever the umask); while one apply
    holds it no other process can; a process started meanwhile does not inherit it (it would
    keep the lock after apply ended)."""
    lock = tmp_path / "apply.lock"
    old = os.umask(0)
    try:
        with install.locked(str(lock)) as held:
            assert held and stat.S_IMODE(lock.lstat().st_mode) == 0o600
            assert subprocess.run(["flock", "--nonblock", str(lock), "true"], timeout=30).returncode == 1
            inherited = subprocess.run(["ls", "-l", "/proc/self/fd/"], capture_output=True, text=True, timeout=30,
                                       close_fds=False)  # as os.system or a fork would
            assert str(lock) not in inherited.stdout, inherited.stdout
    finally:
        os.umask(old)
    assert subprocess.run(["flock", "--nonblock", str(lock), "true"], timeout=30).returncode == 0


def test_a_write_never_goes_through_a_file_already_at_its_temporary_name(tmp_path: Path) -> None:
    """Should a file appear at a write's temporary name after the plan swept the leftovers (a hard
    link to another file, say), the write fails rather than write into that file (O_EXCL)."""
    outside, real = tmp_path / "outside", tmp_path / "units" / "qubes-socksvc-x.service"
    outside.write_text("precious, and longer than what apply writes\n")
    real.parent.mkdir()
    os.link(outside, install._temp_for(str(real)))
    with pytest.raises(FileExistsError):
        install._write_file(str(real), b"[Unit]\n")
    assert outside.read_text() == "precious, and longer than what apply writes\n" and not real.exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_write_that_cannot_be_renamed_into_place_leaves_no_temporary_name(tmp_path: Path, kind: str) -> None:
    """A directory appeared where the plan saw nothing (a race with another program): the rename
    fails, the error says why, and the temporary file or link is gone."""
    real = tmp_path / "rpc" / "alpha.Echo"
    (real / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        if kind == "file":
            install._write_file(str(real), b"x\n")
        else:
            install._write_symlink(str(real), "/run/qubes/socksvc-alpha.sock")
    assert sorted(os.listdir(real.parent)) == ["alpha.Echo"]


def test_execute_refuses_a_plan_with_conflicts(world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """install.execute, for code that plans by itself: a plan with a conflict changes nothing."""
    manifest, root, outside = world(A)
    plant(root, f"{RPC}/alpha.Echo", lambda p: p.write_text("#!/bin/sh\n"))
    loaded = load_manifest(str(manifest))
    layout = Layout.for_manifest(loaded)
    plan = install.plan(render.render(loaded, layout), layout, str(root))
    assert plan.conflicts and plan.changes
    before = snapshot(root, outside)
    with pytest.raises(install.ApplyError, match=r"^the plan has conflicts; nothing was changed$"):
        install.execute(plan)
    assert snapshot(root, outside) == before



def test_execute_never_writes_a_record_it_could_not_read_back(
        world: Callable[[str], tuple[Path, Path, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """install.execute, for code that plans by itself (or a plan made before the cap changed):
    a record larger than load_state reads (MAX_STATE_SIZE) is refused before anything is
    written, even the widened record; plan refuses it first, this is the net."""
    manifest, root, outside = world(A)
    loaded = load_manifest(str(manifest))
    layout = Layout.for_manifest(loaded)
    plan = install.plan(render.render(loaded, layout), layout, str(root))
    assert not plan.conflicts and plan.changes
    size = len(install._record(install._widened(plan)))
    monkeypatch.setattr(install, "MAX_STATE_SIZE", size - 1)
    before = snapshot(root, outside)
    with pytest.raises(install.ApplyError, match=rf"the ownership record would be {size} bytes, more than apply "
                                                 rf"reads back \({size - 1}\); nothing more was written"):
        install.execute(plan)
    assert snapshot(root, outside) == before
    monkeypatch.setattr(install, "MAX_STATE_SIZE", size)  # exactly the cap: written
    install.execute(plan)
    assert len((root / RECORD).read_bytes()) <= size


def test_apply_leaves_no_descriptor_open_and_the_umask_as_it_was(
        world: Callable[[str], tuple[Path, Path, Path]]) -> None:
    """In a long-lived process (a test, a tool calling cli.main), apply opens and closes its files,
    and writes with umask 022 only while it writes: the process's own umask is given back."""
    manifest, root, _ = world(A)
    before = sorted(os.listdir("/proc/self/fd"))
    old = os.umask(0o077)
    try:
        assert apply_in_process(manifest, root)[0] == 0
        manifest.write_text(B)
        assert apply_in_process(manifest, root)[0] == 0
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(old)
    assert sorted(os.listdir("/proc/self/fd")) == before


def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubes_socksvc", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"},
                          user="nobody", group="nogroup", extra_groups=[], cwd="/", timeout=60)


def test_a_dry_run_as_a_user_needs_no_lock_and_an_apply_refuses_cleanly() -> None:
    """Even while root holds the lock, a user's dry run answers at once; a user's apply says why not."""
    top = world_dir("socksvc-nobody-")
    try:
        manifest, root = top / "m.yaml", top / "root"
        manifest.write_text(A)
        manifest.chmod(0o644)
        before = snapshot(top)
        with install.locked():
            result = run_as_nobody("apply", "-c", str(manifest), "--root", str(root), "--dry-run")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "create    /etc/qubes-rpc/alpha.Echo" in result.stdout and "dry run: " in result.stdout
            assert f"dry run without the apply lock (only root can take {install.LOCK_FILE})" in result.stderr
            result = run_as_nobody("apply", "-c", str(manifest), "--root", str(root))
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert f"{install.LOCK_FILE}: cannot take the apply lock" in result.stderr
            assert "--dry-run" in result.stderr
        assert snapshot(top) == before
    finally:
        shutil.rmtree(top)


def _unsearchable(rpc: Path) -> None:
    rpc.chmod(0o700)


def _writable_not_searchable(rpc: Path) -> None:
    os.chown(rpc, pwd.getpwnam("nobody").pw_uid, -1)
    rpc.chmod(0o600)


@pytest.mark.parametrize(("how", "words"), [
    (_unsearchable, "{rpc} cannot be searched by this user; apply writes as root"),
    (_writable_not_searchable, "{rpc} cannot be searched by this user; apply writes as root"),
    (lambda rpc: rpc.parent.chmod(0o700), "{rpc}: Permission denied"),
    (lambda rpc: None, "{rpc} is not writable by this user; apply writes as root"),
])
def test_a_users_dry_run_names_the_directory_it_cannot_judge(applied_for_nobody: tuple[Path, Path],
                                                            how: Callable[[Path], object], words: str) -> None:
    """A user's dry run over root's tree: a directory the user may not search (or one above it)
    or write is a conflict naming it, not an error about one of its files (was: "[Errno 13]
    Permission denied: '.../etc/qubes-rpc/alpha.Echo'" for a directory it could not search)."""
    manifest, root = applied_for_nobody
    manifest.write_text(B)  # changes in the qubes-rpc directory
    how(root / RPC)
    before = snapshot(root.parent)
    result = run_as_nobody("apply", "-c", str(manifest), "--root", str(root), "--dry-run")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert words.format(rpc=root / RPC) in result.stdout, result.stdout + result.stderr
    assert snapshot(root.parent) == before


# --- bounded inputs: the ownership record (issue 10) ------------------------------------------

#: README, "Bounded inputs": the record is at most 16 MiB.
RECORD_CAP = 16 << 20


def sparse_record(path: Path) -> None:
    path.write_text('{"version": 1, "owned": {}}')
    os.truncate(path, RECORD_CAP + 1)


RECORDS: dict[str, tuple[Callable[[Path], object], str]] = {
    # name: (how to plant it, words expected)
    "a FIFO": (os.mkfifo, "the ownership record is a FIFO, not a regular file"),
    "a directory": (lambda p: p.mkdir(), "the ownership record is a directory, not a regular file"),
    "larger than the cap": (sparse_record, f"larger than {RECORD_CAP} bytes"),
    "from a newer qubes-socksvc": (lambda p: p.write_text('{"version": 2, "owned": {}}'),
                                   "an ownership record of version 2 (this qubes-socksvc reads version 1)"),
    "deeply nested JSON": (lambda p: p.write_text('{"owned": ' + "[" * 200_000 + "]" * 200_000 + "}"),
                           "unreadable ownership record (nested too deeply)"),
    "cut short": (lambda p: p.write_text('{"version": 1, "owned": {"/etc/x": ['),
                  "unreadable ownership record (Expecting value: line 1 column 37 (char 36))"),
}


@pytest.mark.parametrize("case", sorted(RECORDS))
@pytest.mark.parametrize("verb", ["apply", "check", "list"])
def test_a_hostile_record_is_refused_at_once_and_nothing_is_written(
        world: Callable[[str], tuple[Path, Path, Path]], case: str, verb: str) -> None:
    how, words = RECORDS[case]
    manifest, root, outside = world(A)
    root.mkdir()
    plant(root, RECORD, how)
    before = snapshot(root, outside)
    result = subprocess.run([sys.executable, "-m", "qubes_socksvc", verb, "-c", str(manifest), "--root", str(root)],
                            capture_output=True, text=True, timeout=20,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert_refused(result, before, root, outside, words=words)
    assert f"{root / RECORD}: " in result.stderr and "restore or delete it, then apply again" in result.stderr

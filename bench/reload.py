# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``python -m bench.reload [REV]``: how soon a call is served with the spec ``apply`` renamed in.

A daemon serves the bench's spec; a second spec, the same plus ``example.Added``, is renamed
into place as ``apply`` does (a temporary file beside it, then rename(2)), and the old one back,
alternately.  After each rename one client calls ``example.Added`` at once and again until the
answer matches the spec now in place: the delay is from the rename to that reply, and "first" counts
the renames whose very first call was served with the new spec.  With REV, that commit's daemon
(a temporary worktree) is measured the same way, in turns with this tree's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from . import client
from .figures import DAEMON, MANIFEST, SOCKET_DIR
from .processes import REPO, SYSTEM_PYTHON, Journal, Process, Workdir, compile_spec, precompile

ADDED = "      example.Added:\n        handler: qubes_socksvc.examples:hello\n"
CALL = b"example.Added dom0\0"


def _raw(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(CALL)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return b"service=example.Added" in reply


def measure(rev: str | None, renames: int) -> list[str]:
    work = Workdir()
    trees = {"this": REPO}
    old = None
    journal = Journal(work)
    servers: dict[str, tuple[Process, Path]] = {}
    try:
        if rev is not None:
            old = Path(tempfile.mkdtemp(prefix="socksvc-reload-", dir="/tmp")) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old), rev], check=True)
            subprocess.run(["chmod", "-R", "a+rX", str(old.parent)], check=True)
            trees[rev] = old
        socket_path = f"{SOCKET_DIR}/socksvc-{DAEMON}-{os.getpid()}.sock"
        text = MANIFEST.format(daemon=DAEMON, socket=socket_path)
        specs = []
        for name, manifest in (("a", text), ("b", text + ADDED)):
            sub = Workdir()
            sub.path.rename(work.path / name)
            sub.path = work.path / name
            specs.append(compile_spec(sub, sub.file("bench.yaml", manifest), DAEMON).read_bytes())
        for tag, tree in trees.items():
            spec_dir = work.path / f"spec-{tag.replace('/', '_')}"
            spec_dir.mkdir()
            spec_dir.chmod(0o755)
            spec = spec_dir / f"{DAEMON}.json"
            spec.write_bytes(specs[0])
            spec.chmod(0o644)
            bind = work.path / f"bind-{len(servers)}"
            bind.mkdir()
            bind.chmod(0o777)
            sink = journal.sink(str(len(servers)))
            argv = [SYSTEM_PYTHON, "-P", "-m", "qubes_socksvc", "serve", DAEMON, "--spec", str(spec),
                    "--bind-dir", str(bind)]
            servers[tag] = (Process(tag, Journal.argv(sink, argv), str(bind / os.path.basename(socket_path)),
                                    work.path / f"{len(servers)}.log", drop=False,
                                    env=Journal.env(sink, PYTHONPATH=str(tree))).wait_listening(), spec)
        delays: dict[str, list[float]] = {tag: [] for tag in servers}
        first: dict[str, int] = dict.fromkeys(servers, 0)
        for i in range(renames):
            added = i % 2 == 0
            for tag, (server, spec) in servers.items():
                tmp = spec.with_name(f".{DAEMON}.json.tmp")
                tmp.write_bytes(specs[1] if added else specs[0])
                tmp.chmod(0o644)
                renamed = time.monotonic()
                tmp.rename(spec)
                tries = 0
                while _raw(server.socket) != added:
                    tries += 1
                    if time.monotonic() - renamed > 30:
                        raise client.BenchError(f"{tag}: the new spec not served after 30 s")
                delays[tag].append(time.monotonic() - renamed)
                first[tag] += tries == 0
                time.sleep(0.05)
    finally:
        for server, _ in servers.values():
            server.stop()
        for sink_process in journal.sinks:
            sink_process.stop()
        if old is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
            shutil.rmtree(old.parent, ignore_errors=True)
        work.cleanup()
    lines = [f"rename of the spec -> first reply served with it, {renames} renames each:"]
    for tag, values in delays.items():
        ms = sorted(v * 1e3 for v in values)
        lines.append(f"  {tag}: median {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms; the very first call "
                     f"after the rename served with the new spec in {first[tag]}/{renames}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="a commit to measure beside this tree, e.g. 19ef8e6")
    parser.add_argument("--renames", type=int, default=200)
    args = parser.parse_args(argv)
    precompile()
    print("\n".join(measure(args.rev, args.renames)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

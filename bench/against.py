# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``python -m bench.against REV``: is this tree's warm call slower than REV's?  Side by side.

The shared machine's speed swings by a third between runs, so a figure from another day
says nothing about a regression.  This starts both daemons at once (this checkout's, and
REV's from a temporary ``git worktree``), each on the bundled example handlers and the
same loop, and alternates rounds of back-to-back warm calls between them and the floor.
It prints each one's median latency and the daemon's CPU time per call (``/proc/PID/schedstat``),
and the per-round ratios this/REV: below 1.00 is faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from . import client
from .figures import DAEMON, DESCRIPTOR, SMALL_INPUT, Bench, Sizes
from .processes import NO_UVLOOP, REPO, SYSTEM_PYTHON, Journal, Process, Workdir, precompile, start_floor


def _cpu_seconds(pid: int) -> float:
    """CPU time of the process's main thread, in nanoseconds precision (/proc/PID/stat counts
    clock ticks: 10 ms, 5 % of a round).  The warm calls never start a thread."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _start(bench: Bench, tree: Path, tag: str, stock_loop: bool) -> Process:
    """``serve`` from ``tree``, with the spec (or, before the compiled spec existed, the manifest),
    logging as its unit would: to the journal (a sink standing in for journald, Journal)."""
    bind = bench.work.path / f"against-{tag}"
    bind.mkdir()
    bind.chmod(0o777)
    source = ["--spec", str(bench.spec)] if "--spec" in (tree / "qubes_socksvc/cli.py").read_text() \
        else ["-c", str(bench.manifest)]
    pythonpath = f"{NO_UVLOOP}:{tree}" if stock_loop else str(tree)
    argv = [SYSTEM_PYTHON, "-m", "qubes_socksvc", "serve", DAEMON, *source, "--bind-dir", str(bind)]
    sink = bench.journal.sink(tag)
    return Process(tag, Journal.argv(sink, argv), str(bind / os.path.basename(bench.activation_socket)),
                   bench.work.path / f"{tag}.log", drop=False,
                   env=Journal.env(sink, PYTHONPATH=pythonpath)).wait_listening()


def compare(rev: str, rounds: int, calls: int, stock_loop: bool) -> list[str]:
    work = Workdir()
    old = Path(tempfile.mkdtemp(prefix="socksvc-against-", dir="/tmp")) / "tree"
    try:
        # Inside the try: a failed add (a bad REV, git's lock taken) leaves no directory behind.
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old), rev], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(old.parent)], check=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(old / "qubes_socksvc")], check=True,
                       stdout=subprocess.DEVNULL)
        bench = Bench(Sizes(), work)
        servers = {"this": _start(bench, REPO, "this", stock_loop), rev: _start(bench, old, "rev", stock_loop),
                   "floor": start_floor(work, "floor")}
        latency: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for r in range(rounds):
                names = list(servers)
                for name in names[r % 3:] + names[:r % 3]:  # each goes first in turn
                    server = servers[name]
                    before = _cpu_seconds(server.pid)
                    times = client.sequential(server.socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT, calls)
                    cpu[name].append((_cpu_seconds(server.pid) - before) / calls)
                    latency[name].append(statistics.median(times))
        finally:
            for server in [*servers.values(), *bench.journal.sinks]:
                server.stop()
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
        shutil.rmtree(old.parent, ignore_errors=True)
        work.cleanup()

    def ratio(values: dict[str, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(values["this"], values[rev], strict=True))

    med = statistics.median

    def vs_floor(name: str) -> float:
        return med(a / b for a, b in zip(latency[name], latency["floor"], strict=True))
    loop = "asyncio's loop" if stock_loop else "the default loop"
    spread = {name: f"{min(ratios):.3f}-{max(ratios):.3f}" for name, ratios in (
        ("latency", [a / b for a, b in zip(latency["this"], latency[rev], strict=True)]),
        ("cpu", [a / b for a, b in zip(cpu["this"], cpu[rev], strict=True)]))}
    return [
        f"warm call, {rounds} rounds x {calls} calls, {loop}, side by side with {rev}; logging: {bench.journal.how}:",
        f"  median latency   this {med(latency['this']) * 1e6:.0f} µs   {rev} {med(latency[rev]) * 1e6:.0f} µs"
        f"   floor {med(latency['floor']) * 1e6:.0f} µs   this/{rev} {ratio(latency):.3f}",
        f"  daemon CPU/call  this {med(cpu['this']) * 1e6:.1f} µs   {rev} {med(cpu[rev]) * 1e6:.1f} µs"
        f"   this/{rev} {ratio(cpu):.3f}",
        f"  spread of this/{rev} over the rounds: latency {spread['latency']}, CPU {spread['cpu']}; "
        f"latency/floor: this {vs_floor('this'):.3f}, {rev} {vs_floor(rev):.3f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.against", description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare with, e.g. c08a0a5")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=3000, help="warm calls per round and server")
    parser.add_argument("--stock-loop", action="store_true", help="both daemons on asyncio's loop (uvloop hidden)")
    args = parser.parse_args(argv)
    precompile()
    print("\n".join(compare(args.rev, args.rounds, args.calls, args.stock_loop)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

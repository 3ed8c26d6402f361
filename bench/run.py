# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""``python -m bench [--quick] [--only FIGURES]``: run the figures, print one table."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from . import figures, processes
from .report import VOID, Row, machine, now, table

GROUPS = {
    "1": ("warm_and_concurrent", ("1a", "1b", "2a", "2b", "2c")),
    "2": ("warm_and_concurrent", ("1a", "1b", "2a", "2b", "2c")),
    "3": ("streaming", ("3a", "3b")),
    "4": ("cold", ("4",)),
    "5": ("idle_memory", ("5a", "5b")),
    "6": ("apply", ("6a", "6b")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny run that only proves every figure works")
    parser.add_argument("--only", metavar="FIGURES", default="123456",
                        help="figures to run, e.g. 14 (default: all six)")
    args = parser.parse_args(argv)
    if not args.only or set(args.only) - set(GROUPS):
        parser.error(f"--only takes figure numbers among {''.join(GROUPS)}, e.g. --only 14")
    sizes = figures.QUICK if args.quick else figures.Sizes()
    started = time.monotonic()
    processes.raise_fd_limit()
    processes.precompile()
    work = processes.Workdir()
    bench = figures.Bench(sizes, work)
    rows: list[Row] = []
    notes: list[str] = []
    failed = False
    done: set[str] = set()
    try:
        for figure in args.only:
            method, ids = GROUPS[figure]
            if method in done:
                continue
            done.add(method)
            print(f"bench: figure {figure} ({method})...", file=sys.stderr, flush=True)
            try:
                result = getattr(bench, method)()
            except Exception as e:
                failed = True
                traceback.print_exc()
                rows += [Row(i, method, "failed", str(e).splitlines()[0][:80], "", "", VOID) for i in ids]
                continue
            if isinstance(result, tuple):
                result, extra = result
                notes += extra
            rows += result
    finally:
        for sink in bench.journal.sinks:
            sink.stop()
        work.cleanup()
    rows.sort(key=lambda r: r.id)
    mode = " (--quick: sizes too small to mean anything)" if args.quick else ""
    print(f"qubes-socksvc benchmark, {now()}{mode}")
    print(f"machine: {machine()}")
    print(f"python: {processes.SYSTEM_PYTHON} {sys.version.split()[0]} (servers run as "
          f"{processes.UNPRIVILEGED if processes.as_root() else 'this user'})")
    loops = [v.loop for v in bench.variants]
    print(f"daemon event loop: {loops[0]}" + ("; rows marked * hide uvloop: the same daemon on asyncio's loop"
                                               if len(loops) > 1 else " (python3-uvloop not installed)"))
    print()
    print(table(rows))
    print()
    for note in notes + bench.notes:
        print(note)
    print(f"total bench time {time.monotonic() - started:.0f} s")
    return 1 if failed else 0

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Rows, units, and the one table (Markdown, so RESULTS.md can hold it verbatim)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MET, NOT_YET, REPORTED, VOID = "met", "NOT YET", "reported", "VOID"


@dataclass(frozen=True)
class Row:
    id: str
    figure: str
    measured: str
    reference: str
    ratio: str = ""
    target: str = ""
    verdict: str = REPORTED


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / (1 << 20):,.0f} MiB/s"


def ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def judge(ok: bool) -> str:
    return MET if ok else NOT_YET


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = "? RAM"
    load = ", load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, {mem}, Linux {platform.release()}{load}"


def table(rows: list[Row]) -> str:
    head = ("#", "figure", "qubes-socksvc", "reference (same run)", "ratio", "target", "verdict")
    cells = [head] + [(r.id, r.figure, r.measured, r.reference, r.ratio, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The six figures of issue 5, each beside its reference, measured in the same run.

Rounds interleave the daemon and its reference (each goes first in turn), each
round yields a median, and every ratio is the median of the per-round ratios:
drift on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import client
from .processes import (
    BENCH,
    NO_UVLOOP,
    REPO,
    SYSTEM_PYTHON,
    Journal,
    Process,
    Workdir,
    account,
    as_root,
    child_env,
    compile_spec,
    floor_argv,
    serve_argv,
    start_activated,
    start_daemon,
    start_floor,
    start_socat,
    uvloop_version,
)
from .report import REPORTED, VOID, Row, judge, median, mib, percentile, rate, ratio, seconds

T = TypeVar("T")
DAEMON = "bench"
SOCKET_DIR = "/run/qubes"
DESCRIPTOR = b"example.Echo dom0\0"
SMALL_INPUT = b"a small request: one line of text, as most qrexec calls carry.\n" * 2

#: The bundled example handlers (as in examples/qubes-socksvc.yaml) on a socket of the bench's own.
# socket_group names a group in /etc/group, as the default "qubes" is in every Qubes VM: a group
# glibc's "files" cannot answer makes it load libnss_systemd (0.4 MiB of RSS) for --bind-dir's
# chown, which no Qubes VM pays.
MANIFEST = """\
version: 1
daemons:
  {daemon}:
    description: qubes-socksvc benchmark (the bundled example handlers)
    socket: {socket}
    socket_group: nogroup
    idle_exit: 0
    max_connections: 256
    services:
      example.Echo:
        handler: qubes_socksvc.examples:echo
        max_input: 0
      example.Hello:
        handler: qubes_socksvc.examples:hello
      example.Hello+friend:
        handler: qubes_socksvc.examples:hello
        timeout: 5
      example.Sha256:
        handler: qubes_socksvc.examples:sha256
        max_input: 0
      example.Upper:
        handler: qubes_socksvc.examples:upper
        max_input: 65536
"""


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does: the full run, or --quick for the smoke test."""

    rounds: int = 15
    warm_calls: int = 500
    exec_calls: int = 2
    callers: int = 1000
    calls_each: int = 3
    load_rounds: int = 9
    stream_bytes: int = 1 << 30
    stream_rounds: int = 5
    cold_rounds: int = 11
    rss_rounds: int = 5
    apply_services: int = 500
    apply_rounds: int = 3


QUICK = Sizes(rounds=2, warm_calls=50, exec_calls=1, callers=100, calls_each=1, load_rounds=1,
              stream_bytes=16 << 20, stream_rounds=1, cold_rounds=1, rss_rounds=1, apply_rounds=1)


@dataclass(frozen=True)
class Variant:
    """The daemon as installed (``mark`` ""), or with uvloop hidden (``mark`` "*")."""

    mark: str
    loop: str
    pythonpath: str

    def label(self, text: str) -> str:
        return text if not self.mark else f"{text} [stock asyncio loop]"


class Bench:
    def __init__(self, sizes: Sizes, work: Workdir) -> None:
        self.sizes = sizes
        self.work = work
        self.activation_socket = f"{SOCKET_DIR}/socksvc-{DAEMON}-{os.getpid()}.sock"
        self.manifest = work.file("bench.yaml", MANIFEST.format(daemon=DAEMON, socket=self.activation_socket))
        self.spec = compile_spec(work, self.manifest, DAEMON)
        self.notes: list[str] = []
        self._tags = 0
        self.journal = Journal(work)
        self._sinks: dict[int, Process] = {}
        """Each daemon's journal sink, by the daemon's pid."""
        uvloop = uvloop_version()
        self.variants = [Variant("", f"uvloop {uvloop}" if uvloop else "asyncio", str(REPO))]
        if uvloop:
            self.variants.append(Variant("*", "asyncio", f"{NO_UVLOOP}:{REPO}"))

    def _tag(self) -> str:
        self._tags += 1
        return str(self._tags)

    def daemon(self, variant: Variant | None = None) -> Process:
        v = variant or self.variants[0]
        tag = self._tag()
        sink = self.journal.sink(tag)
        daemon = start_daemon(self.work, self.spec, DAEMON, self.activation_socket, tag,
                              pythonpath=v.pythonpath, name=f"qubes-socksvc{v.mark}", journal=sink)
        if sink is not None:
            self._sinks[daemon.pid] = self.journal.sinks[-1]
        return daemon

    def _logged_calls(self, daemon: Process) -> int:
        """How many example.Echo calls the stopped ``daemon`` logged at INFO (to its journal
        sink, or its log file); BenchError if it logged an error there."""
        sink = self._sinks.pop(daemon.pid, None)
        if sink is None:
            return daemon.log_text().count(": INFO: call example.Echo from dom0")
        sink.stop()
        found = re.search(r"entries (\d+) calls (\d+) errors (\d+)", sink.log_text())
        if found is None or found[3] != "0":
            raise client.BenchError(f"{daemon.name}'s journal sink: {sink.log_text()[-2000:]}")
        return int(found[2])

    def floor(self) -> Process:
        return start_floor(self.work, self._tag())

    # --- 1 and 2: warm calls, one after another and a thousand at once ------------

    def warm_and_concurrent(self) -> list[Row]:
        s = self.sizes
        daemons = [self.daemon(v) for v in self.variants]
        floor = self.floor()
        servers = [*daemons, floor]
        try:
            payload = DESCRIPTOR + SMALL_INPUT
            for server in servers:
                client.sequential(server.socket, payload, SMALL_INPUT, max(20, s.warm_calls // 5))
            lat: dict[str, list[float]] = {p.name: [] for p in servers}
            exe: list[float] = []
            for r in range(s.rounds):
                for p in _rotated(servers, r):
                    lat[p.name].append(median(client.sequential(p.socket, payload, SMALL_INPUT, s.warm_calls)))
                exe.append(median([self._exec_call(SMALL_INPUT) for _ in range(s.exec_calls)]))
            rows = []
            for v, d in zip(self.variants, daemons, strict=True):
                limit = 1.3 if v.mark else 1.1  # issue 26: uvloop's (the package's) within 1.10x
                vs_floor = median([a / b for a, b in zip(lat[d.name], lat[floor.name], strict=True)])
                vs_exec = median([e / a for e, a in zip(exe, lat[d.name], strict=True)])
                rows += [
                    Row(f"1a{v.mark}", v.label(f"warm call, {len(SMALL_INPUT)} B echo: median latency"),
                        seconds(median(lat[d.name])), f"floor {seconds(median(lat[floor.name]))}", ratio(vs_floor),
                        f"≤ {limit}x floor", judge(vs_floor <= limit)),
                    Row(f"1b{v.mark}", v.label("warm call vs one process per call"), seconds(median(lat[d.name])),
                        f"exec {seconds(median(exe))}", f"{ratio(vs_exec)} faster", "≥ 60x faster",
                        judge(vs_exec >= 60)),
                ]
            rows += self._concurrent(daemons, floor)
        finally:
            for p in servers:
                p.stop()
        least = s.rounds * s.warm_calls + s.load_rounds * s.callers * s.calls_each
        for d in daemons:
            self._check_log(d)
            logged = self._logged_calls(d)
            if logged < least:
                raise client.BenchError(f"{d.name} logged {logged} calls at INFO, fewer than the {least} made")
        self.notes.append(f"1, 2, 3: the daemon logs as its unit does: {self.journal.how}; every call of 1 and 2 "
                          f"was logged at INFO (at least {least} lines each)")
        return rows

    def _exec_call(self, data: bytes) -> float:
        env = child_env(QREXEC_SERVICE_FULL_NAME="example.Echo", QREXEC_REMOTE_DOMAIN="dom0")
        uid, gid = account()
        privileges: dict[str, object] = {"user": uid, "group": gid, "extra_groups": []} if as_root() else {}
        start = time.perf_counter()
        done = subprocess.run([SYSTEM_PYTHON, str(BENCH / "exec_service.py")], input=data, stdout=subprocess.PIPE,
                              env=env, cwd="/", check=True, **privileges)  # type: ignore[call-overload]
        elapsed = time.perf_counter() - start
        if done.stdout != data:
            raise client.BenchError(f"exec reference: wrong reply {done.stdout[:60]!r}")
        return elapsed

    def _concurrent(self, daemons: list[Process], floor: Process) -> list[Row]:
        s = self.sizes
        servers = [*daemons, floor]
        result: dict[str, list[client.LoadResult]] = {p.name: [] for p in servers}
        for r in range(s.load_rounds):
            for p in _rotated(servers, r):
                result[p.name].append(client.concurrent(p.socket, DESCRIPTOR, s.callers, s.calls_each))
        f = result[floor.name]
        f_correct = sum(x.correct for x in f)
        f_p99 = median([percentile(x.latencies, 0.99) for x in f])
        title = f"{s.callers} concurrent callers x {s.calls_each} calls"
        rows = []
        for v, daemon in zip(self.variants, daemons, strict=True):
            d = result[daemon.name]
            rates = median([a.rate / b.rate for a, b in zip(d, f, strict=True)])
            d_correct, total = sum(x.correct for x in d), sum(x.calls for x in d)
            rows.append(Row(f"2a{v.mark}", v.label(f"{title}: calls/s"), f"{median([x.rate for x in d]):,.0f}/s",
                            f"floor {median([x.rate for x in f]):,.0f}/s", ratio(rates), "≥ 0.8x floor",
                            judge(rates >= 0.8 and d_correct == total)))
            if v.mark:
                if d_correct != total:
                    raise client.BenchError(f"{daemon.name}: {total - d_correct} of {total} calls answered wrongly")
                continue
            d_p99 = median([percentile(x.latencies, 0.99) for x in d])
            rows += [
                Row("2b", f"{title}: p99 latency", seconds(d_p99), f"floor {seconds(f_p99)}", ratio(d_p99 / f_p99),
                    "reported", REPORTED),
                Row("2c", f"{title}: answered correctly", f"{d_correct}/{total}", f"floor {f_correct}/{total}",
                    "", "all", judge(d_correct == total)),
            ]
        return rows

    # --- 3: streaming through the echo handler --------------------------------------

    def streaming(self) -> list[Row]:
        s = self.sizes
        block = client.pattern_block()
        socat_block = 65536
        contenders: list[Variant | None] = [*self.variants, None]  # None: socat
        rates: dict[str, list[float]] = {v.mark: [] for v in self.variants}
        ref: list[float] = []
        growth: dict[str, list[int]] = {v.mark: [] for v in self.variants}
        warm_up = min(s.stream_bytes, 64 << 20)  # first touches of the client's buffers, page cache
        self._socat_stream(block, socat_block, warm_up)
        warm = self.daemon()
        try:
            client.stream(warm.socket, DESCRIPTOR, warm_up, block)
        finally:
            warm.stop()
            self._logged_calls(warm)
        for r in range(s.stream_rounds):
            for v in _rotated(contenders, r):
                if v is None:
                    ref.append(self._socat_stream(block, socat_block))
                    continue
                daemon = self.daemon(v)
                try:
                    client.sequential(daemon.socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT, 5)
                    time.sleep(0.1)
                    if not daemon.reset_peak_rss():
                        self.notes.append("3b: could not reset VmHWM; the growth shown is peak minus idle")
                    before = daemon.rss_kib()
                    rates[v.mark].append(client.stream(daemon.socket, DESCRIPTOR, s.stream_bytes, block))
                    growth[v.mark].append(daemon.peak_rss_kib() - before)
                    self._check_log(daemon)
                finally:
                    daemon.stop()
                    self._logged_calls(daemon)
        size = f"{s.stream_bytes >> 30} GiB" if s.stream_bytes >= 1 << 30 else f"{s.stream_bytes >> 20} MiB"
        rows = []
        for v in self.variants:
            vs_socat = median([a / b for a, b in zip(rates[v.mark], ref, strict=True)])
            rows.append(Row(f"3a{v.mark}", v.label(f"stream {size} through example.Echo: throughput"),
                            rate(median(rates[v.mark])), f"socat relay {rate(median(ref))}", ratio(vs_socat),
                            "≥ 0.5x socat", judge(vs_socat >= 0.5)))
            if not v.mark:
                worst = max(growth[v.mark])
                rows.append(Row("3b", f"stream {size}: daemon peak RSS growth", mib(worst), "limit 16.0 MiB", "",
                                "≤ 16 MiB", judge(worst <= 16 * 1024)))
        return rows

    def _socat_stream(self, block: bytes, socat_block: int, size: int = 0) -> float:
        tag = self._tag()
        sink_path = str(self.work.path / f"sink-{tag}.sock")
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sink.bind(sink_path)
            os.chmod(sink_path, 0o777)  # socat runs unprivileged
            sink.listen(1)
            socat = start_socat(self.work, tag, socat_block, sink_path)
            try:
                return client.stream(socat.socket, b"", size or self.sizes.stream_bytes, block, relay=sink)
            finally:
                socat.stop()
        finally:
            sink.close()

    # --- 4: a cold call through real socket activation ------------------------------

    def cold(self) -> tuple[list[Row], list[str]]:
        s = self.sizes
        problem = _activation_problem()
        if problem is not None:
            return [Row("4", "cold call via systemd-socket-activate", "n/a", problem, "", "≤ 1.5x", VOID)], []
        contenders: list[Variant | None] = [*self.variants, None]  # None: python3 -c "import asyncio"
        cold: dict[str, list[float]] = {v.mark: [] for v in self.variants}
        ref: list[float] = []
        with _socket_dir():
            for r in range(s.cold_rounds + 1):  # the first round warms the page cache and is dropped
                got = {v.mark if v else None: self._cold_call(v) if v else self._import_asyncio()
                       for v in _rotated(contenders, r)}
                if r:
                    ref.append(got.pop(None))
                    for mark, seconds_ in got.items():
                        cold[str(mark)].append(seconds_)
            modules = self._serve_modules()
        rows = []
        for v in self.variants:
            vs_ref = median([a / b for a, b in zip(cold[v.mark], ref, strict=True)])
            rows.append(Row(f"4{v.mark}", v.label("cold call via systemd-socket-activate: first reply"),
                            seconds(median(cold[v.mark])), f"python3 -c 'import asyncio' {seconds(median(ref))}",
                            ratio(vs_ref), "≤ 1.5x", judge(vs_ref <= 1.5)))
        return rows, modules

    def _activated(self, variant: Variant, *python_options: str) -> Process:
        """The daemon as its unit runs it, on the manifest's socket: started by the first call."""
        return start_activated(self.work, serve_argv(DAEMON, self.spec, *python_options), self.activation_socket,
                               self._tag(), f"socket activation{variant.mark}", pythonpath=variant.pythonpath,
                               fdname=f"socksvc-{DAEMON}")

    def _cold_call(self, variant: Variant) -> float:
        proc = self._activated(variant)
        try:
            return client.first_reply(self.activation_socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT)
        finally:
            proc.stop()
            self._check_log(proc)
            if os.path.exists(self.activation_socket):
                os.unlink(self.activation_socket)

    def _import_asyncio(self) -> float:
        uid, gid = account()
        start = time.perf_counter()
        subprocess.run([SYSTEM_PYTHON, "-c", "import asyncio"], env=child_env(), cwd="/", check=True,
                       user=uid, group=gid, extra_groups=[])
        return time.perf_counter() - start

    def _serve_modules(self) -> list[str]:
        """Which modules a socket-activated serve imports beyond ``import asyncio`` (-X importtime)."""
        proc = self._activated(self.variants[0], "-X", "importtime")
        try:
            client.first_reply(self.activation_socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT)
        finally:
            proc.stop()
            if os.path.exists(self.activation_socket):
                os.unlink(self.activation_socket)
        log = proc.log
        ref = subprocess.run([SYSTEM_PYTHON, "-X", "importtime", "-c", "import asyncio"], env=child_env(),
                             cwd="/", check=True, stderr=subprocess.PIPE, text=True).stderr
        serve_times = _import_times(log.read_text(errors="replace"))
        base = set(_import_times(ref))
        extra = {name: us for name, us in serve_times.items() if name not in base}
        tops: dict[str, float] = {}
        for name, self_us in extra.items():
            top = name.split(".")[0]
            tops[top] = tops.get(top, 0) + self_us
        listed = ", ".join(f"{name} {us / 1000:.1f}" for name, us in sorted(tops.items(), key=lambda kv: -kv[1]))
        lines = [
            f"serve path: {len(serve_times)} modules imported, {len(extra)} beyond `python3 -c 'import asyncio'` "
            f"({sum(extra.values()) / 1000:.1f} ms of import time); by package, ms: {listed}",
        ]
        heavy = sorted(name for name in ("jinja2", "markupsafe", "argparse", "json", "uvloop") if name in tops)
        lines.append("serve path: jinja2 not imported" if "jinja2" not in tops
                     else "serve path: JINJA2 IS IMPORTED — it must not be")
        if heavy:
            lines.append(f"serve path: also imports {', '.join(heavy)}")
        return lines

    # --- 5: idle memory -------------------------------------------------------------

    def idle_memory(self) -> tuple[list[Row], list[str]]:
        """RSS and PSS of the idle daemon after its first call, beside the floor's: both
        socket-activated by systemd-socket-activate, both on the same loop, side by side.

        The floor is the seed document's example server (bench/floor.py): asyncio and
        ``systemd.daemon.listen_fds``, the pieces the design cannot do without, so the ratio
        is what the daemon adds to them.  The two run at once, so the pages they share
        (libpython, libc) are charged to both alike in PSS.
        """
        problem = _activation_problem()
        if problem is not None:
            return [Row(f"5{x}{v.mark}", v.label(f"idle daemon {what} after its first call"), "n/a", problem, "",
                        "≤ 1.10x floor", VOID) for x, what in (("a", "RSS"), ("b", "PSS")) for v in self.variants], []
        daemon: dict[str, list[tuple[int, int]]] = {v.mark: [] for v in self.variants}
        floor: dict[str, list[tuple[int, int]]] = {v.mark: [] for v in self.variants}
        with _socket_dir():
            for r in range(self.sizes.rss_rounds):
                for v in _rotated(self.variants, r):  # one loop at a time: the daemons share the manifest's socket
                    pair = [self._activated(v), self._activated_floor(v)]
                    try:
                        for p in _rotated(pair, r):
                            client.sequential(p.socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT, 1)
                        time.sleep(0.3)
                        daemon[v.mark].append(pair[0].rss_pss_kib())
                        floor[v.mark].append(pair[1].rss_pss_kib())
                    finally:
                        for p in pair:
                            p.stop()
                            self._check_log(p)
            notes = self._beyond_floor()
        rows = []
        for v in self.variants:
            for x, what, k in (("a", "RSS", 0), ("b", "PSS", 1)):
                d = [m[k] for m in daemon[v.mark]]
                f = [m[k] for m in floor[v.mark]]
                vs_floor = median([a / b for a, b in zip(d, f, strict=True)])
                rows.append(Row(f"5{x}{v.mark}", v.label(f"idle daemon {what} after its first call"),
                                mib(median(d)), f"floor {mib(median(f))}", ratio(vs_floor), "≤ 1.10x floor",
                                judge(vs_floor <= 1.10)))
        return rows, notes

    def _activated_floor(self, variant: Variant, *python_options: str) -> Process:
        path = str(self.work.path / f"floor-activated-{self._tag()}.sock")
        return start_activated(self.work, floor_argv(path, *python_options), path, self._tag(),
                               f"floor activated{variant.mark}", pythonpath=variant.pythonpath)

    def _beyond_floor(self) -> list[str]:
        """The modules the idle daemon holds that the floor does not (-X importtime of both,
        socket-activated, after one call), per loop."""
        notes = []
        for v in self.variants:
            imported = []
            for proc in (self._activated(v, "-X", "importtime"), self._activated_floor(v, "-X", "importtime")):
                try:
                    client.sequential(proc.socket, DESCRIPTOR + SMALL_INPUT, SMALL_INPUT, 1)
                finally:
                    proc.stop()
                imported.append(set(_import_times(proc.log_text())))
            extra = imported[0] - imported[1]
            ours = sorted(m for m in extra if m.split(".")[0] == "qubes_socksvc")
            others = sorted(m for m in extra if m.split(".")[0] != "qubes_socksvc")
            missing = sorted(imported[1] - imported[0])
            notes.append(f"5{v.mark}: the daemon imports {len(extra)} modules the floor does not "
                         f"({len(ours)} of qubes_socksvc; the others: {', '.join(others) or 'none'})"
                         + (f"; the floor imports {', '.join(missing)} that the daemon does not" if missing else ""))
        return notes

    # --- 6: apply on a large manifest -----------------------------------------------

    def apply(self) -> list[Row]:
        s = self.sizes
        manifest = self.work.file("apply.yaml", _big_manifest(s.apply_services))
        cold, again, check, written, files = [], [], [], [], 0
        for _ in range(s.apply_rounds):
            root = self.work.path / f"root-{self._tag()}"
            root.mkdir()
            check.append(_timed_cli("check", "-c", str(manifest))[0])
            t, out = _timed_cli("apply", "-c", str(manifest), "--root", str(root))
            cold.append(t)
            before = _snapshot(root)
            files = sum(1 for path in before if not path.endswith("apply.lock"))
            t, out = _timed_cli("apply", "-c", str(manifest), "--root", str(root))
            again.append(t)
            if "up to date" not in out:
                raise client.BenchError(f"apply with no change did not say 'up to date':\n{out}")
            after = _snapshot(root)
            written.append(sum(1 for p in before.keys() | after.keys() if before.get(p) != after.get(p)))
            shutil.rmtree(root, ignore_errors=True)
        ref = median(check)
        return [
            Row("6a", f"apply, {s.apply_services} services, cold", f"{seconds(median(cold))}, {files} files",
                f"check {seconds(ref)}", ratio(median(cold) / ref), "reported", REPORTED),
            Row("6b", f"apply, {s.apply_services} services, no change",
                f"{seconds(median(again))}, {max(written)} writes", f"check {seconds(ref)}",
                ratio(median(again) / ref), "writes nothing", judge(max(written) == 0)),
        ]

    # --- helpers ----------------------------------------------------------------------

    def _check_log(self, proc: Process) -> None:
        text = proc.log_text()
        for bad in ("Traceback", "ERROR", "internal error"):
            if bad in text:
                raise client.BenchError(f"{proc.name} logged {bad}:\n{text[-2000:]}")


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _activation_problem() -> str | None:
    """Why socket activation cannot be measured here, if it cannot."""
    if shutil.which("systemd-socket-activate") is None:
        return "systemd-socket-activate is not installed (Debian package systemd)"
    if not as_root():
        return f"needs root: the manifest's sockets live in {SOCKET_DIR}"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed (Debian package util-linux)"
    return None


@contextlib.contextmanager
def _socket_dir() -> Iterator[None]:
    """SOCKET_DIR for the manifest's socket, removed afterwards if it was made here and is empty."""
    created = not os.path.isdir(SOCKET_DIR)
    if created:
        os.makedirs(SOCKET_DIR, mode=0o755)
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(SOCKET_DIR)  # only if still empty: never anyone else's files


def _rotated(items: list[T], r: int) -> list[T]:
    """Round ``r``'s order: each contender goes first in turn, so drift hits all alike."""
    k = r % len(items)
    return items[k:] + items[:k]


def _import_times(text: str) -> dict[str, float]:
    """``-X importtime`` output -> {module: self time in µs}."""
    times: dict[str, float] = {}
    for match in _IMPORT_LINE.finditer(text):
        times[match.group(4)] = float(match.group(1))
    return times


def _big_manifest(services: int, per_daemon: int = 100) -> str:
    lines = ["version: 1", "daemons:"]
    for n in range(services):
        if n % per_daemon == 0:
            lines += [f"  apply{n // per_daemon}:", f"    description: apply benchmark {n // per_daemon}",
                      "    services:"]
        name = f"bench.Service{n:04d}" + ("+arg" if n % 5 == 4 else "")
        lines += [f"      {name}:", "        handler: qubes_socksvc.examples:echo"]
        if n % 3 == 0:
            lines.append("        wait_for_session: true")
    return "\n".join(lines) + "\n"


def _timed_cli(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([SYSTEM_PYTHON, "-m", "qubes_socksvc", *args], env=child_env(), cwd="/",
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise client.BenchError(f"qubes-socksvc {' '.join(args)} failed:\n{done.stdout}")
    return elapsed, done.stdout


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """path -> (inode, size, mtime, ctime): any write, rename or chmod changes it."""
    state = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            state[path] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return state

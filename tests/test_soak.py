# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Soak (issue 6, part 5): a bounded run of mixed honest and hostile traffic against one daemon,
sampling its RSS and file descriptors; fails on growth, on a wrong answer, on a death.

SOAK_SECONDS of traffic (25 s by default, at most 60 s in CI; set QUBES_SOCKSVC_SOAK_SECONDS for
a longer local run).  Honest callers check every byte of every answer; hostile callers send
what tests/test_hostile.py sends, one case at a time, at random.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable

from tests.conftest import RunningDaemon
from tests.test_hostile import (
    HOSTILE_MANIFEST,
    MAX_CONNECTIONS,
    RSS_SLACK_KIB,
    assert_recovered,
    connect,
    read_until_closed,
    send_ignoring_reset,
    settle,
)

SOAK_SECONDS = min(float(os.environ.get("QUBES_SOCKSVC_SOAK_SECONDS", "25")), 600)
HONEST_WORKERS = 4
HOSTILE_WORKERS = 4
#: RSS may rise this much from the first third of the run to the last (allocator noise).
GROWTH_LIMIT_KIB = 8 * 1024


def honest(sock_path: str, rng: random.Random) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        payload = rng.randbytes(rng.choice([0, 1, 1000, 70_000, 300_000]))
        expected, wire = payload, b"h.Echo+%d work\0" % rng.randrange(1000)
    elif kind == 1:
        payload = rng.randbytes(rng.randrange(1, 5000))
        expected, wire = payload.upper(), b"h.Upper work\0"
    elif kind == 2:
        payload, wire = b"", b"h.Fields+a sys-net keyword dispvm\0"
        expected = (b"service=h.Fields+a\nname=h.Fields\nargument='a'\nsource='sys-net'\n"
                    b"target_type='keyword'\ntarget='dispvm'\n")
    else:
        payload, wire = b"", b"h.Linger+100000 work\0"
        expected = b"r" * 100_000
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(sock_path)
        sock.sendall(wire + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = read_until_closed(sock)
    assert reply == expected, f"{wire!r}: {len(reply)} bytes, expected {len(expected)}"


def hostile_cases(daemon: RunningDaemon) -> list[Callable[[random.Random], None]]:
    def simple(wire: bytes) -> Callable[[random.Random], None]:
        def case(rng: random.Random) -> None:
            with connect(daemon, timeout=30) as sock:
                send_ignoring_reset(sock, wire)
                sock.shutdown(socket.SHUT_WR)
                assert read_until_closed(sock) == b"", wire
        return case

    def oversized(rng: random.Random) -> None:
        with connect(daemon, timeout=30) as sock:
            send_ignoring_reset(sock, b"h.Echo " + b"a" * rng.choice([65_000, 200_000]))
            read_until_closed(sock)

    def reset_mid_reply(rng: random.Random) -> None:
        with connect(daemon, timeout=30) as sock:
            sock.sendall(b"h.Huge work\0")
            sock.shutdown(socket.SHUT_WR)
            got = 0
            while got < rng.choice([1, 65536, 1 << 20]):
                data = sock.recv(65536)
                assert data
                got += len(data)

    def slowloris(rng: random.Random) -> None:
        with connect(daemon, timeout=30) as sock:
            for byte in b"h.Echo wor":
                sock.send(bytes([byte]))
                time.sleep(0.05)
            if rng.random() < 0.5:
                assert read_until_closed(sock) == b""  # cut off at the descriptor timeout

    def just_exec(rng: random.Random) -> None:
        with connect(daemon, timeout=30) as sock:
            sock.sendall(rng.choice([b"h.Echo work\0", b"h.Raises work\0", b"h.Upper work\0"]))

    def flood(rng: random.Random) -> None:
        with connect(daemon, timeout=30) as sock:
            sock.sendall(b"h.Small work\0")
            send_ignoring_reset(sock, b"z" * (2 << 20))
            read_until_closed(sock)

    return [
        simple(b"\0"), simple(b"h.Echo w\xffrk\0junk"), simple(b"../h.Echo work\0"), simple(b"h.Echo+a/b work\0"),
        simple(b"h.E\x1b[2Jcho work\0"), simple(b"h.Echo work"), simple(b"h.Nothing work\0"),
        simple(b"h.Raises work\0"), simple(b"h.Exits work\0"), simple(b"h.PlainExits work\0"),
        simple(b"h.KeyboardInterrupt work\0"), simple(b"h.Hangs work\0"), simple(b"h.PlainHangs work\0"),
        oversized, reset_mid_reply, slowloris, just_exec, flood,
    ]


def test_soak_mixed_traffic_without_growth(start_daemon: type[RunningDaemon]) -> None:
    daemon = start_daemon(HOSTILE_MANIFEST, "h")
    base = settle(daemon)
    cases = hostile_cases(daemon)
    stop = threading.Event()
    errors: list[str] = []
    counts = {"honest": 0, "hostile": 0}
    lock = threading.Lock()
    samples: list[tuple[float, int, int]] = []

    def worker(seed: int, is_honest: bool) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                if is_honest:
                    honest(daemon.socket(), rng)
                else:
                    rng.choice(cases)(rng)
            except Exception as e:  # collected: the run goes on, the test fails at the end
                with lock:
                    errors.append(f"{'honest' if is_honest else 'hostile'}: {e!r}")
            else:
                with lock:
                    counts["honest" if is_honest else "hostile"] += 1

    def sampler() -> None:
        start = time.monotonic()
        while not stop.wait(0.25):
            if daemon.proc.poll() is not None:
                return
            samples.append((time.monotonic() - start, daemon.fd_count(), daemon.rss_kib()))

    threads = [threading.Thread(target=worker, args=(i, i < HONEST_WORKERS))
               for i in range(HONEST_WORKERS + HOSTILE_WORKERS)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    try:
        time.sleep(SOAK_SECONDS)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert daemon.proc.poll() is None, f"daemon died:\n{daemon.log_text()[-3000:]}"
    assert not errors, f"{len(errors)} failures, first: {errors[:5]}"
    assert counts["honest"] >= 20 * SOAK_SECONDS and counts["hostile"] >= 5 * SOAK_SECONDS, counts

    print(f"soak: {counts}, {len(samples)} samples, fds max {max(s[1] for s in samples)} (base {base.fds}), "
          f"RSS {min(s[2] for s in samples)}..{max(s[2] for s in samples)} KiB (base {base.rss_kib})")
    # Bounded while it ran: never more connections than slots, RSS flat from start to end.
    most_fds = max(fds for _, fds, _ in samples)
    assert most_fds <= base.fds + MAX_CONNECTIONS, f"{most_fds} fds, baseline {base.fds}"
    settled = [s for s in samples if s[0] > SOAK_SECONDS * 0.2]
    third = max(len(settled) // 3, 1)
    early = statistics.median(rss for _, _, rss in settled[:third])
    late = statistics.median(rss for _, _, rss in settled[-third:])
    assert late - early <= GROWTH_LIMIT_KIB, f"RSS grew from {early} to {late} KiB during the run"
    assert max(rss for _, _, rss in samples) <= base.rss_kib + 4 * RSS_SLACK_KIB
    # ...and back to the baseline once it is over.
    assert_recovered(daemon, base, timeout=20)

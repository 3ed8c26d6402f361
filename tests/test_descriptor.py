# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The descriptor parser: every form qrexec sends, and nothing else."""

from __future__ import annotations

import random

import pytest

from qubes_socksvc import descriptor
from qubes_socksvc.descriptor import Descriptor, DescriptorError, parse


@pytest.mark.parametrize("wire, expected", [
    (b"my.Service+arg work", Descriptor("my.Service", "arg", "work")),
    (b"my.Service+ work", Descriptor("my.Service", "", "work")),
    (b"my.Service work", Descriptor("my.Service", None, "work")),
    (b"my.Service+arg work name dom0", Descriptor("my.Service", "arg", "work", "name", "dom0")),
    (b"my.Service dom0 keyword dispvm", Descriptor("my.Service", None, "dom0", "keyword", "dispvm")),
    (b"my.Service+a-b_c.d sys-net keyword dispvm:default-dvm",
     Descriptor("my.Service", "a-b_c.d", "sys-net", "keyword", "dispvm:default-dvm")),
    (b"my.Service+fe80++1+22 work", Descriptor("my.Service", "fe80++1+22", "work")),
    (b"my.Service+ dom0 keyword adminvm", Descriptor("my.Service", "", "dom0", "keyword", "adminvm")),
])
def test_valid_forms(wire: bytes, expected: Descriptor) -> None:
    parsed = parse(wire)
    assert parsed == expected
    assert parsed.encode() == wire + b"\0"


def test_service_property_keeps_the_form_called() -> None:
    assert parse(b"a+ q").service == "a+"
    assert parse(b"a q").service == "a"
    assert parse(b"a+x q").service == "a+x"


@pytest.mark.parametrize("wire, words", [
    (b"", "fields"),
    (b"my.Service", "fields"),
    (b"my.Service work name", "fields"),
    (b"my.Service  work", "fields"),
    (b"my.Service work name dom0 extra", "fields"),
    (b"../x work", "invalid service"),
    (b"a/b work", "invalid service"),
    (b"my.Service+../x work", "invalid service"),
    (b"my.Service+a/b work", "invalid service"),
    (b"my.Service @adminvm", "invalid source"),
    (b"+arg work", "invalid service"),
    (b"a" * 256 + b" work", "invalid service"),
    (b"my.Service wo/rk", "invalid source"),
    (b"my.Service " + b"w" * 32, "invalid source"),
    (b"my.Service work other dom0", "invalid target type"),
    (b"my.Service work keyword @dispvm!", "invalid target"),
    (b"my.Service w\xc3\xa9rk", "not ASCII"),
    (b"my.Service work\n", "invalid source"),
    (b"my.Service\twork", "fields"),
    (b"x" * 65535, "too long"),
])
def test_invalid_descriptors_are_rejected(wire: bytes, words: str) -> None:
    with pytest.raises(DescriptorError, match=words):
        parse(wire)


def test_longest_allowed_service_name() -> None:
    """NAME_MAX for NAME, MAX_SERVICE_NAME_LEN for the whole (libqrexec/exec.c: parse_qubes_rpc_command)."""
    name = "a" * 255 + "+" + "b" * (65000 - 256)
    assert parse(name.encode() + b" work").service == name


def test_a_validated_descriptor_cannot_be_altered() -> None:
    """What the sanitize block validated is what every later use sees: the fields are read-only."""
    import dataclasses

    desc = parse(b"my.Service+arg work")
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.source = "dom0"  # type: ignore[misc]
    assert desc.source == "work"


# --- the validated descriptors parse remembers (issue 26) ------------------------------------

#: Valid descriptors and malformed ones a byte away from them: prefixes, one byte changed,
#: a field added or dropped, a valid one with a trailing space.
NEIGHBOURS = [
    b"my.Service+arg work", b"my.Service+arg work ", b"my.Service+arg wor", b"my.Service+arg wor/",
    b"my.Service+arg", b"my.Service+ar/ work", b"my.Service+arg work name dom0", b"my.Service+arg work name",
    b"my.Service+arg work name dom0 x", b"my.Service+arg work nam dom0", b"my.Service+arg work name @dom0",
    b"my.Service work", b"my.Service w\xc3\xa9rk", b"my.Service work\n", b"my.Service  work", b"a q", b"a+ q",
    b"a+x q", b"x" * 65535, b"x" * 65534, b"",
]


def _fresh(wire: bytes) -> Descriptor | str:
    """What validating ``wire`` alone gives: its Descriptor, or the DescriptorError's message."""
    try:
        return descriptor.validate(wire)
    except DescriptorError as e:
        return str(e)


def _remembered(wire: bytes) -> Descriptor | str:
    try:
        return parse(wire)
    except DescriptorError as e:
        return str(e)


@pytest.fixture
def empty_memory(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, Descriptor]:
    """parse's memory, empty at the start of the test and restored after it."""
    memory: dict[bytes, Descriptor] = {}
    monkeypatch.setattr(descriptor, "_parsed", memory)
    return memory


def test_a_descriptors_validity_never_depends_on_what_came_before(empty_memory: dict[bytes, Descriptor]) -> None:
    """Whatever other descriptors a daemon validated before, and in whatever order, each one is
    accepted or refused exactly as it would be alone: a caller cannot make another's malformed
    descriptor pass, or a valid one fail or read as another, by calling first."""
    expected = {wire: _fresh(wire) for wire in NEIGHBOURS}
    assert {isinstance(e, Descriptor) for e in expected.values()} == {True, False}  # both kinds are tried
    interleaved = [w for pair in zip(NEIGHBOURS, NEIGHBOURS[::-1], strict=True) for w in pair]
    orders = [NEIGHBOURS, NEIGHBOURS[::-1], interleaved]
    rng = random.Random(26)
    orders += [rng.sample(NEIGHBOURS, len(NEIGHBOURS)) for _ in range(20)]
    for order in orders:
        empty_memory.clear()
        for _ in range(2):  # the second pass answers from memory
            for wire in order:
                assert _remembered(wire) == expected[wire], wire[:40]


def test_a_malformed_descriptor_is_never_remembered(empty_memory: dict[bytes, Descriptor]) -> None:
    """Only validated descriptors are remembered: a malformed one is checked, and refused, each
    time it is sent, and never stored as valid."""
    for wire in NEIGHBOURS:
        for _ in range(3):
            _remembered(wire)
    assert set(empty_memory) == {w for w in NEIGHBOURS if isinstance(_fresh(w), Descriptor)
                                 and len(w) <= descriptor.PARSE_CACHE_MAX_BYTES}
    assert all(empty_memory[w] == _fresh(w) for w in empty_memory)


def test_what_parse_remembers_is_bounded(empty_memory: dict[bytes, Descriptor]) -> None:
    """A caller sending ever new descriptors (a new argument each call) cannot grow the daemon:
    at most PARSE_CACHE_SIZE are held, and each is still answered as validated alone."""
    wires = [b"my.Service+%d work" % i for i in range(descriptor.PARSE_CACHE_SIZE * 3 + 7)]
    for wire in wires:
        assert parse(wire) == Descriptor("my.Service", wire.split(b" ")[0][11:].decode(), "work")
        assert len(empty_memory) <= descriptor.PARSE_CACHE_SIZE
    assert all(parse(wire) == _fresh(wire) for wire in wires)


def test_what_parse_remembers_holds_at_most_128_kib(empty_memory: dict[bytes, Descriptor]) -> None:
    """The bound descriptor.py states: at most 256 descriptors of at most 512 bytes each (128 KiB)
    are held; a longer one (a long argument) is validated every time and never held.  (What is
    held below the bound only saves time: each answer is the same validation either way.)"""
    for size in range(480, 560):
        for n in range(8):  # 8 of each size: 264 to remember, so the store fills and is emptied
            wire = b"my.Service+" + b"%d-" % n + b"a" * (size - 16 - len(b"%d-" % n)) + b" work"
            assert len(wire) == size and parse(wire) == descriptor.validate(wire)
            assert len(empty_memory) <= 256 and sum(map(len, empty_memory)) <= 128 * 1024
    empty_memory.clear()
    too_long = b"my.Service+" + b"a" * (513 - 16) + b" work"
    assert parse(too_long) == descriptor.validate(too_long) and not empty_memory


def test_only_exact_bytes_are_remembered(empty_memory: dict[bytes, Descriptor]) -> None:
    """A bytearray or a bytes subclass (whose equality could be its own) is validated, never
    remembered nor answered from memory."""

    class Loose(bytes):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash(b"my.Service work")

    assert parse(b"my.Service work") == Descriptor("my.Service", None, "work")
    assert parse(bytearray(b"my.Service+x work")) == Descriptor("my.Service", "x", "work")  # type: ignore[arg-type]
    with pytest.raises(DescriptorError):
        parse(Loose(b"my.Service wo/rk"))
    assert set(empty_memory) == {b"my.Service work"}


def test_a_long_descriptor_is_validated_each_time_never_held(empty_memory: dict[bytes, Descriptor]) -> None:
    """256 callers each sending a valid 65 KB descriptor must not leave 16 MiB held: one longer
    than PARSE_CACHE_MAX_BYTES is validated, answered, and not remembered."""
    short = b"my.Service+a work"
    long = b"my.Service+" + b"a" * (descriptor.PARSE_CACHE_MAX_BYTES) + b" work"
    assert parse(short) == _fresh(short) and parse(long) == _fresh(long)
    assert isinstance(_fresh(long), Descriptor)
    assert set(empty_memory) == {short}

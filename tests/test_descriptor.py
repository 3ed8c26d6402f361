# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The descriptor parser: every form qrexec sends, and nothing else."""

from __future__ import annotations

import pytest

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

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The service descriptor: untrusted bytes from the caller -> a validated Descriptor.

qrexec sends the part of its command after ``QUBESRPC `` verbatim, with one NUL
(libqrexec/exec.c: find_qrexec_service): in a VM ``SERVICE SOURCE\\0``
(daemon/qrexec-daemon.c builds ``QUBESRPC %s%s %s``), in dom0
``SERVICE SOURCE TARGET_TYPE TARGET\\0`` (``QUBESRPC %s%s %s %s %s``).  ``SERVICE``
is ``NAME``, ``NAME+`` or ``NAME+ARG``, the argument possibly holding more ``+``.
Everything here is checked with qrexec's own charsets and limits (qrexec.py)
before a handler sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import qrexec


class DescriptorError(ValueError):
    """The descriptor is malformed; the message is safe to log (no raw bytes)."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A validated descriptor.  Field meanings follow qrexec's ``QREXEC_*`` variables."""

    name: str
    """The service name without argument."""
    argument: str | None
    """``None`` without ``+``, ``""`` for ``NAME+``, else the argument."""
    source: str
    """``QREXEC_REMOTE_DOMAIN``: the calling qube."""
    target_type: str | None = None
    """``name`` or ``keyword`` (dom0 form only)."""
    target: str | None = None
    """The requested target, keywords without their ``@`` (dom0 form only)."""

    @property
    def service(self) -> str:
        """``QREXEC_SERVICE_FULL_NAME``: ``NAME``, ``NAME+`` or ``NAME+ARG`` as called."""
        return qrexec.full_name(self.name, self.argument)

    def encode(self) -> bytes:
        """The wire form including its terminating NUL."""
        fields = [self.service, self.source]
        if self.target_type is not None and self.target is not None:
            fields += [self.target_type, self.target]
        return " ".join(fields).encode("ascii") + b"\0"


def parse(untrusted_descriptor: bytes) -> Descriptor:
    """Validate a descriptor without its NUL.  Raises DescriptorError."""
    if len(untrusted_descriptor) >= qrexec.MAX_DESCRIPTOR_LEN:  # with its NUL, at most the limit
        raise DescriptorError("descriptor too long")
    if not untrusted_descriptor.isascii():
        raise DescriptorError("descriptor is not ASCII")
    untrusted_fields = untrusted_descriptor.decode("ascii").split(" ")
    if len(untrusted_fields) not in (2, 4):
        raise DescriptorError(f"descriptor has {len(untrusted_fields)} fields, expected 2 or 4")

    # --- sanitize start ---
    untrusted_service, untrusted_source = untrusted_fields[:2]
    if not qrexec.is_service(untrusted_service):
        raise DescriptorError("invalid service name or argument")
    if not qrexec.is_source(untrusted_source):
        raise DescriptorError("invalid source domain")
    target_type = target = None
    if len(untrusted_fields) == 4:
        untrusted_target_type, untrusted_target = untrusted_fields[2:]
        if untrusted_target_type not in qrexec.TARGET_TYPES:
            raise DescriptorError("invalid target type")
        if not qrexec.is_target(untrusted_target):
            raise DescriptorError("invalid target")
        target_type, target = untrusted_target_type, untrusted_target
    name, argument = qrexec.split_service(untrusted_service)
    source = untrusted_source
    # --- sanitize end ---
    return Descriptor(name, argument, source, target_type, target)

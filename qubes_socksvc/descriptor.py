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

A descriptor validated once is remembered, keyed on its exact bytes (:func:`parse`): a warm
call's descriptor is usually one seen before (one service, one caller), and its validation was
5 % of a warm call (issue 26).  Why that cannot let one caller change what another gets:

- The key is the whole untrusted ``bytes`` object as received (without its NUL), compared by
  value (anything but ``bytes`` itself, a bytearray or a subclass with an equality of its own,
  is validated without memory): two descriptors share an entry only if they are the same
  bytes, and validation is a pure function of those bytes (no spec, no state, no time, no
  caller is consulted), so the remembered result is the one a fresh validation would give.
- Only a validated result is stored, after every check passed; a malformed descriptor raises
  before anything is stored, so it is validated again (and rejected again) every time.
- The value is the frozen, slotted :class:`Descriptor`, whose fields are ``str`` or None:
  nothing can change it in place, and handlers never see it (callcore copies its fields into
  the Request).
- The store is bounded: at PARSE_CACHE_SIZE entries it is emptied before the next one is
  stored, so a caller sending ever new descriptors costs a validation each, as without it,
  and only descriptors of at most PARSE_CACHE_MAX_BYTES are remembered (a long argument is
  validated every time): at most PARSE_CACHE_SIZE x PARSE_CACHE_MAX_BYTES (128 KiB) are held,
  never 256 callers' 65 KB descriptors.
  Emptying is one atomic dict operation: a plain handler's thread that validates (the
  testing kit's ``call``) cannot see a half-evicted store.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import qrexec

#: Validated descriptors remembered at most (module docstring: why it is safe).  A daemon's
#: callers send a few distinct descriptors: a service and its argument, from a few qubes.
PARSE_CACHE_SIZE = 256
#: Descriptors longer than this are validated every time, never remembered (a service, its
#: argument and its qubes fit in far less; a 65 KB argument must not be held for later).
PARSE_CACHE_MAX_BYTES = 512
#: Descriptor bytes (exact, without the NUL) -> the Descriptor they validated to.
_parsed: dict[bytes, Descriptor] = {}


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
    """Validate a descriptor without its NUL.  Raises DescriptorError.

    The result for the same bytes validated before is the remembered one (module docstring).
    """
    if type(untrusted_descriptor) is not bytes or len(untrusted_descriptor) > PARSE_CACHE_MAX_BYTES:
        return validate(untrusted_descriptor)  # a bytearray, a subclass with its own ==; a long one
    found = _parsed.get(untrusted_descriptor)
    if found is not None:
        return found
    validated = validate(untrusted_descriptor)
    if len(_parsed) >= PARSE_CACHE_SIZE:
        _parsed.clear()
    _parsed[untrusted_descriptor] = validated
    return validated


def validate(untrusted_descriptor: bytes) -> Descriptor:
    """Validate a descriptor without its NUL, every time: :func:`parse` without its memory."""
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

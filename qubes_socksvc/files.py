# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Reading a file we were told to trust, without letting it block us or eat our memory.

A FIFO named as a manifest would block ``open()`` or ``read()`` forever (and with
it ``postinst``); a device or a runaway file would be read without end.  Every
file qubes-socksvc reads as input (the manifest, the ownership record, an
rpc-config) goes through :func:`read_regular`.
"""

from __future__ import annotations

import os
import stat

from .errors import SocksvcError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class FileRefused(SocksvcError):
    """A file that cannot be read, is not a regular file, or is larger than its cap."""


def read_regular(path: str, limit: int, what: str) -> bytes:
    """The content of the regular file ``path``, at most ``limit`` bytes.

    Opened non-blocking (a FIFO's ``open()`` returns at once) and refused before
    any read unless it is a regular file; ``what`` names it in the error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise FileRefused(f"{path}: cannot read {what}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise FileRefused(f"{path}: the {what} is {kind}, not a regular file; "
                              "name a regular file (nothing was read)")
        chunks: list[bytes] = []
        size = 0
        while st.st_size <= limit and size <= limit:  # the file may grow while we read
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise FileRefused(f"{path}: cannot read {what}: {e.strerror}") from e
    finally:
        os.close(fd)
    if st.st_size > limit or size > limit:
        raise FileRefused(f"{path}: the {what} is larger than {limit} bytes, the most qubes-socksvc reads; "
                          "check that this is the right file, or make it smaller")
    return b"".join(chunks)

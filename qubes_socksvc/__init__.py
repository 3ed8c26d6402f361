# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qubes-socksvc: qrexec socket services from one declarative manifest."""

from __future__ import annotations

from .request import InputTooLarge, Request

__all__ = ["InputTooLarge", "Request"]


def __getattr__(name: str) -> str:
    """``__version__``, from the one place it is written: the top-level ``version`` file, which
    setup.cfg (``version = file: version``), debian/changelog and the RPM spec follow.  Looked up
    only when asked for (PEP 562): importlib.metadata would cost every socket activation."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata
    from pathlib import Path

    top = Path(__file__).resolve().parent.parent
    if (top / "setup.cfg").is_file() and (top / "version").is_file():  # a source tree
        return (top / "version").read_text().strip()
    return metadata.version("qubes-socksvc")

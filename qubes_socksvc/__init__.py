# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""qubes-socksvc: qrexec socket services from one declarative manifest."""

from .request import InputTooLarge, Request

__all__ = ["InputTooLarge", "Request"]
__version__ = "0.1.0"

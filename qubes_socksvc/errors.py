# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The base of every error a user sees: one clear message and an exit code."""

from __future__ import annotations


class SocksvcError(Exception):
    """A failure with a message meant for the user."""

    exit_code = 1

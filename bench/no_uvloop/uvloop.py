# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Put first on PYTHONPATH by the bench: hides an installed uvloop, so the daemon runs on asyncio's loop."""

raise ImportError("uvloop hidden by bench/no_uvloop for the stock-asyncio rows")

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""Benchmarks for qubes-socksvc: every figure beside a reference measured in the same run.

``python -m bench`` (or ``make bench``) prints one table; ``--quick`` is a tiny
run for the smoke test.  See bench/RESULTS.md for the latest table and what
each figure means.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The bundled example handlers (used by examples/qubes-socksvc.yaml and ``make demo``)."""

from __future__ import annotations

from .request import Request


async def echo(request: Request) -> None:
    """Stream the input back as it arrives; constant memory for any input size."""
    async for chunk in request:
        request.write(chunk)
        await request.drain()


async def hello(request: Request) -> str:
    """Show what the descriptor told us, like an executable service's QREXEC_* variables."""
    lines = [
        f"service={request.service}",
        f"name={request.name}",
        f"argument={request.argument if request.argument is not None else '(none)'}",
        f"source={request.source}",
    ]
    if request.target_type is not None:
        lines.append(f"target={request.target_type}:{request.target}")
    return "\n".join(lines) + "\n"


async def sha256(request: Request) -> str:
    """A running hash: reads any amount of input in chunks, answers with its SHA-256."""
    import hashlib  # here, not at the top: the other handlers' daemons need not pay for it

    digest = hashlib.sha256()
    async for chunk in request:
        digest.update(chunk)
    return digest.hexdigest() + "\n"


def upper(request: Request) -> bytes:
    """A plain function: runs in a worker thread with the whole input in ``request.input``."""
    assert request.input is not None
    return request.input.upper()

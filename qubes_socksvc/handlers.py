"""``module:callable`` -> a coroutine function taking a Request.

Handlers are imported on their first call, so a daemon starts without paying for
(or failing on) handlers nobody calls.  Plain functions run in a worker thread
with the whole input already read into ``request.input``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .request import Request

Result = bytes | str | None
Handler = Callable[[Request], Awaitable[Result]]


class HandlerError(Exception):
    """A handler spec that cannot be imported or is not callable."""


def load(spec: str) -> Handler:
    """Import ``module:callable`` and adapt it to ``async (Request) -> Result``."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except Exception as e:  # an import can raise anything
        raise HandlerError(f"handler {spec!r} cannot be loaded: {e!r}") from e
    if not callable(target):
        raise HandlerError(f"handler {spec!r} is not callable")
    if inspect.iscoroutinefunction(target):
        return target  # type: ignore[no-any-return]
    return _threaded(target)


def _threaded(function: Callable[[Request], Any]) -> Handler:
    async def run(request: Request) -> Result:
        request.input = await request.read()
        result = await asyncio.get_running_loop().run_in_executor(None, function, request)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    return run


class Registry:
    """Handlers by spec, loaded once each."""

    def __init__(self) -> None:
        self._loaded: dict[str, Handler] = {}

    def get(self, spec: str) -> Handler:
        handler = self._loaded.get(spec)
        if handler is None:
            handler = self._loaded[spec] = load(spec)
        return handler

"""Task helpers for the agent: blocking calls that must finish, and cancellation that must land."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking twin call in a worker thread; if cancelled, let the call finish first.

    A cancelled ``to_thread`` returns at once while the thread goes on using the SQLite
    connection; the next caller would then use it concurrently (seen: "cannot start a
    transaction within a transaction", and a crash inside libsqlite3).
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def cancel_all(tasks: list[asyncio.Task[None]], grace: float = 2.0) -> None:
    """Cancel tasks and wait for them, cancelling again any that swallowed the first request.

    Python 3.11's ``asyncio.wait_for`` can lose a cancellation that races with its result
    (bpo-42130 / gh-86296), and libraries use it inside request handling.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace)
        if pending:
            log.warning("still stopping: %s", ", ".join(t.get_name() for t in pending))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())

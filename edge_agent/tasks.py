"""Task helpers for the agent: blocking calls that must finish, cancellation that must land, and waits for
an event that a timer ends."""

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


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Return once ``event`` is set or ``timeout`` seconds have passed; the event is left set either way.

    For loops that wake on an event or at the end of a period (the twin writer, the cloud drains):
    the period ends by a timer that sets the event, not by ``asyncio.timeout`` cancelling the task,
    so a routine expiry (the writer's, four times a second) costs one callback instead of a
    CancelledError raised through the task and caught. A cancel of the caller lands as usual
    (``wait_for`` is avoided for the same reason as elsewhere: on 3.11 it can swallow one, gh-86296).
    The caller clears the event before it waits again.
    """
    if event.is_set():
        return
    timer = asyncio.get_running_loop().call_later(timeout, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


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

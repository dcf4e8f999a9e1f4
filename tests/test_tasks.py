"""edge_agent.tasks: waits for an event that a timer ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from edge_agent.tasks import wait_event


async def test_a_set_event_ends_the_wait_before_the_timer() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, event.set)
    started = time.monotonic()
    await wait_event(event, 30.0)
    assert event.is_set()
    assert time.monotonic() - started < 10.0


async def test_the_timer_ends_the_wait_and_leaves_the_event_set() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    await wait_event(event, 0.2)
    assert time.monotonic() - started >= 0.2
    assert event.is_set()  # the caller clears it before waiting again


async def test_an_event_already_set_returns_at_once() -> None:
    event = asyncio.Event()
    event.set()
    started = time.monotonic()
    await wait_event(event, 30.0)
    assert time.monotonic() - started < 5.0


async def test_a_cancelled_wait_raises_and_its_timer_never_fires() -> None:
    event = asyncio.Event()
    task = asyncio.ensure_future(wait_event(event, 0.3))
    await asyncio.sleep(0)  # the task is waiting now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # had the timer been left behind, it would set the event at 0.3 s
    await asyncio.sleep(0.6)
    assert not event.is_set()

"""Shared test plumbing: the fixtures every module can ask for by name, and ``async def`` tests run
on a fresh event loop (no pytest-asyncio needed).

Fixtures live here and only here: a test module names them as arguments and never imports them.
Support code (the broker and PKI classes, fakes, config builders, helpers) lives in plain modules
next to this one and is imported normally.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.commanding import Keys, make_keys
from tests.mqtt_broker import Broker, Pki, make_pki


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run coroutine test functions with asyncio.run, passing only the fixtures they ask for."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway PKI for the whole test session (EC P-256, so it takes milliseconds)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto with mutual TLS on a free port, stopped after the test."""
    with Broker(pki, tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """Ed25519 key pairs for the operators alice, bob, carol and mallory (tests/commanding.py)."""
    return make_keys(tmp_path)

"""One rule for a tool a test needs that this machine lacks: skip locally, fail under CI.

``./dev.sh test`` (and so ``.ci/run``, which sets ``CI=1``) installs every tool the suite uses; a
developer's machine may not have them all, and there the test is skipped with what to install.
Under CI a missing tool would silently drop the tests that depend on it, so it is a failure.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Skip the test with ``message`` (what is missing and how to install it); under CI, fail."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise RuntimeError(f"{message}; under CI a missing tool is a failure, not a skip")
    pytest.skip(message)

"""Defaults the CLI shows in its help, kept apart from browse.py so that building the parser never
imports asyncua (every edge-agent command builds it)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DEPTH = 6
DEFAULT_MAX_NODES = 10_000


def default_data_dir() -> Path:
    """Where browse keeps its OPC UA client certificate unless told otherwise:
    ``$XDG_DATA_HOME/edge-agent``, by default ``~/.local/share/edge-agent``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edge-agent"

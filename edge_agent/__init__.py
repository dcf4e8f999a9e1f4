"""edge-agent: an edge gateway daemon that mirrors OPC UA and Modbus devices into a local SQLite twin."""

from __future__ import annotations

__version__ = "0.1.0"

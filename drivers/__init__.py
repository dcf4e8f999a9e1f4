"""Protocol drivers, registered by the protocol name used in the config file."""

from __future__ import annotations

import importlib

from drivers import asyncua_package
from drivers.base import Driver

asyncua_package.install()  # asyncua without its server, when an OPC UA device imports it

# protocol name -> "module:Class"; imported on first use so a gateway with only Modbus
# devices never imports asyncua, and the other way round.
_REGISTRY: dict[str, str] = {
    "opcua": "drivers.opcua:OpcUaDriver",
    "modbus": "drivers.modbus:ModbusDriver",
    "modbus-rtu": "drivers.modbus:ModbusDriver",
}


def protocols() -> tuple[str, ...]:
    """Every protocol name the registry knows."""
    return tuple(_REGISTRY)


def driver_class(protocol: str) -> type[Driver]:
    """The driver class for a protocol name; KeyError for an unknown one."""
    module_name, _, class_name = _REGISTRY[protocol].partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = ["Driver", "driver_class", "protocols"]

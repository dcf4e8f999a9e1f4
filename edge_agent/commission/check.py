"""``check-config --probe``: connect to every configured device once and read its points, read-only.

Each device gets its own driver (the one the agent would use, with the agent's data_dir and so
its OPC UA client certificate), is connected, read once with ``read`` and closed; devices are
probed at the same time, each bounded by its own ``timeout``. Only ``connect``, ``read`` and
``close`` are called: nothing is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from drivers import driver_class
from drivers.base import BAD, Reading
from edge_agent.config import AgentConfig, DeviceConfig
from edge_agent.errors import DriverError


@dataclass(frozen=True, slots=True)
class DeviceCheck:
    """One device's answer: ``error`` when it could not be connected or read, else its readings."""

    device: str
    protocol: str
    error: str | None
    readings: tuple[Reading, ...] = ()

    @property
    def ok(self) -> bool:
        """Connected, and no point read bad."""
        return self.error is None and all(r.quality != BAD for r in self.readings)


async def check_devices(config: AgentConfig) -> list[DeviceCheck]:
    """Connect to and read every device of ``config`` once, all at the same time; in config order."""
    return list(await asyncio.gather(*(_check(device, config) for device in config.devices)))


async def _check(device: DeviceConfig, config: AgentConfig) -> DeviceCheck:
    driver = driver_class(device.protocol)(device, config.agent.data_dir)
    # connect and read each honour the device's timeout per request; this bounds the whole visit
    # (a secure handshake is several requests) so one silent device cannot hang the command.
    budget = 4 * device.timeout + 5.0
    try:
        async with asyncio.timeout(budget):
            await driver.connect()
            readings: Sequence[Reading] = await driver.read()
    except DriverError as exc:
        return DeviceCheck(device.name, device.protocol, exc.reason)
    except TimeoutError:
        return DeviceCheck(device.name, device.protocol, f"no answer within {budget:g} s")
    finally:
        await driver.close()
    return DeviceCheck(device.name, device.protocol, None, tuple(readings))

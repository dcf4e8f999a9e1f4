"""A real serial line for the Modbus RTU tests: two pseudo-terminals joined by socat.

``socat`` (Debian package ``socat``; ``dev.sh`` installs it) opens a pty pair and copies bytes
between the two ends, as a null-modem cable between two serial ports would. One end is given to
a pymodbus RTU server, the other to the agent's RTU driver: both open a real tty device with
termios settings, exactly as they would /dev/ttyUSB0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def pty_pair(folder: Path) -> Iterator[tuple[str, str]]:
    """Two linked pty device paths (``folder/a``, ``folder/b``), for as long as the block runs."""
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("socat is not installed (apt-get install socat; ./dev.sh test installs it)")
    a, b, log = folder / "a", folder / "b", folder / "socat.log"
    with log.open("wb") as errors:
        process = subprocess.Popen(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):  # socat creates the links once both ptys are open
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socat did not create the pty pair: {log.read_text()[-500:]}")
            time.sleep(0.01)
        yield os.fspath(a), os.fspath(b)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""Headless Chromium (Debian's ``chromium``) for the web page tests: the DOM after scripts ran, and screenshots.

Each call starts a fresh browser with its own empty profile and the flags that keep it off the
network (background networking, component updates, sync), so it only ever talks to the agent on
loopback. ``./dev.sh test`` installs the package; under CI a missing browser is a failure, locally a skip.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import tempfile
from pathlib import Path

from tests.unavailable import unavailable

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    unavailable("chromium is not installed; ./dev.sh test installs it (apt-get install chromium)")


async def _run(*args: str, timeout: float = 60.0) -> bytes:
    binary = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            binary, *FLAGS, f"--user-data-dir={profile}", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(timeout):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    if process.returncode != 0:
        raise AssertionError(f"chromium exited with {process.returncode}: {err.decode(errors='replace')[-2000:]}")
    return out


async def dom(url: str, *, virtual_time_ms: int = 2000) -> str:
    """The page's DOM, serialised after its scripts ran for ``virtual_time_ms`` of (virtual) time."""
    return (await _run(f"--virtual-time-budget={virtual_time_ms}", "--dump-dom", url)).decode()


async def screenshot(url: str, path: Path, *, width: int = 1280, height: int = 1400) -> tuple[int, int]:
    """Save a PNG of the page at ``path``; returns its (width, height) read from the file itself."""
    await _run(f"--window-size={width},{height}", "--virtual-time-budget=1500", f"--screenshot={path}", url)
    return png_size(await asyncio.to_thread(path.read_bytes))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG; AssertionError when ``data`` is not one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)

"""The docs are part of the product: commands, keys and protocols they name must be true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import drivers
from edge_agent import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS = ["run", "check-config", "twin show", "twin history", "twin outbox", "twin events", "twin writes", "status",
            "demo", "keys new", "command", "browse", "probe modbus"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", *command.split(), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: edge-agent" in result.stdout
    assert f"`edge-agent {command}" in README


def test_registry_matches_config_protocols() -> None:
    assert set(drivers.protocols()) == set(config.PROTOCOLS)


def test_every_protocol_has_a_sample_block() -> None:
    example = (ROOT / "config" / "agent.example.toml").read_text()
    for protocol in drivers.protocols():
        assert re.search(rf'^#?\s*protocol = "{re.escape(protocol)}"', example, re.M), protocol


def _keys(table: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(table, dict):
        for key, value in table.items():
            keys.add(f"{prefix}{key}")
            keys |= _keys(value, f"{prefix}{key}.")
    elif isinstance(table, list):
        for item in table:
            keys |= _keys(item, prefix.rstrip(".") + "[].")
    return keys


def test_every_example_key_is_in_the_readme_reference() -> None:
    import tomllib

    example = ROOT / "config" / "agent.example.toml"
    # the commented-out keys count too: uncomment every "# key = value" line
    text = re.sub(r"(?m)^(\s*)# ?([a-z_]+ = )", r"\1\2", example.read_text())
    text = re.sub(r"(?m)^(\s*)# ?(\[\[?(devices|models|mqtt|metrics|gate|optimizer|commands|sparkplug|web))",
                  r"\1\2", text)
    raw = tomllib.loads(text)
    for key in sorted(_keys(raw)):
        if key.endswith(("devices", "points", "plausible")) or ".plausible." in key or ".objective." in key or key in {
                "agent", "twin", "mqtt", "models", "metrics", "gate", "optimizer", "commands", "sparkplug", "web",
                "optimizer.constraints", "optimizer.guards", "commands.operators", "optimizer.objective"}:
            continue
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0]
        assert f"`{key}`" in README or re.search(rf"`{re.escape(parent)}\.[^`]*\b{leaf}\b", README) or (
            f"`{leaf}`" in README and parent in README), f"{key} missing from the README's config reference"

"""An independent Sparkplug B codec for the tests: Eclipse Tahu's reference JavaScript library.

The agent encodes with protobuf from the vendored sparkplug_b.proto; to prove it follows the
format (field numbers, datatypes, the two's complement of signed integers, Long seq and timestamps)
the tests decode what it publishes with Tahu's own ``sparkplug-payload`` (npm, built on protobufjs),
and build a host application's NCMD/DCMD with it. ``./dev.sh test`` installs it into
tests/sparkplug_js/node_modules (``npm ci``). Under CI a missing decoder is a failure; locally a skip.

    with Tahu() as tahu:
        payload = tahu.decode(message.payload)   # {"seq": 3, "metrics": [{"name", "type", "value", ...}]}
        raw = tahu.encode({"metrics": [{"name": "Node Control/Rebirth", "type": "Boolean", "value": True}]})
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.unavailable import unavailable

HERE = Path(__file__).resolve().parent / "sparkplug_js"
_INTEGER_TYPES = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "DateTime"}
# The Sparkplug B DataType numbers (specification, section "Datatypes"), to tell Tahu what a birth declared
DATATYPES = {"Int8": 1, "Int16": 2, "Int32": 3, "Int64": 4, "UInt8": 5, "UInt16": 6, "UInt32": 7, "UInt64": 8,
             "Float": 9, "Double": 10, "Boolean": 11, "String": 12, "DateTime": 13, "Text": 14}


class Tahu:
    """One ``node tahu.js`` process: decode and encode Sparkplug B payloads with Tahu's library.

    Like a host application it remembers the datatype each birth declared for a metric name
    (``types``) and reads later DATA messages, which carry none, with it.
    """

    def __init__(self) -> None:
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            unavailable("node is not installed; ./dev.sh test installs nodejs and npm")
        if not (HERE / "node_modules" / "sparkplug-payload").is_dir():
            unavailable("Tahu's sparkplug-payload is not installed; run: npm ci --prefix tests/sparkplug_js")
        self._process = subprocess.Popen([str(node), str(HERE / "tahu.js")], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, cwd=HERE)
        self.types: dict[str, int] = {}

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer: dict[str, Any] = json.loads(self._process.stdout.readline())
        if not answer["ok"]:
            raise ValueError(answer["error"])
        return answer

    def decode(self, payload: bytes, *, host: bool = True) -> dict[str, Any]:
        """The payload as Tahu reads it; 64-bit integers (seq, timestamps, Int64 values) become ints.

        ``host=False`` decodes the bytes alone, without the datatypes learnt from births.
        """
        request: dict[str, Any] = {"decode": base64.b64encode(payload).decode()}
        if host:
            request["types"] = self.types
        decoded = self._ask(request)["payload"]
        for key in ("seq", "timestamp"):
            if key in decoded:
                decoded[key] = int(decoded[key])
        for metric in decoded.get("metrics", []):
            if "timestamp" in metric:
                metric["timestamp"] = int(metric["timestamp"])
            if metric.get("type") in _INTEGER_TYPES and isinstance(metric.get("value"), str):
                metric["value"] = int(metric["value"])
            if host and "name" in metric and metric.get("type") in DATATYPES:
                self.types[metric["name"]] = DATATYPES[metric["type"]]
        return decoded

    def encode(self, payload: dict[str, Any]) -> bytes:
        """A payload built by Tahu (a host application's NCMD or DCMD)."""
        return base64.b64decode(self._ask({"encode": payload})["base64"])

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)

    def __enter__(self) -> Tahu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

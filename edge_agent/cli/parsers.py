"""The ``edge-agent`` command line: every verb, flag and help text (argparse)."""

from __future__ import annotations

import argparse
from typing import Any

from edge_agent import __version__


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Edge gateway daemon for industrial "
                                     "digital twins: mirrors OPC UA and Modbus devices into a local SQLite twin.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (logs to stderr)")
    run.add_argument("--config", required=True, help="path to the TOML config file")

    check = sub.add_parser("check-config", help="validate a config file without running")
    check.add_argument("--config", required=True, help="path to the TOML config file")
    check.add_argument("--probe", action="store_true",
                       help="also connect to every device once and read its points (read-only: nothing is "
                            "written); exit 1 when a device cannot be read or a point reads bad. Secured OPC UA "
                            "devices use the agent's client certificate under data_dir/pki (created there if "
                            "missing, so run it as the agent's user)")

    status = sub.add_parser("status", help="is the agent running, and what is wrong if anything")
    status.add_argument("--config", required=True, help="path to the TOML config file")
    status.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    twin = sub.add_parser("twin", help="inspect the local twin database")
    twin_sub = twin.add_subparsers(dest="twin_command", required=True, metavar="TWIN_COMMAND")
    show = twin_sub.add_parser("show", help="every point with value, quality, timestamp and unit, and its desired "
                                            "state (value, version, source, status, reason) when it has one")
    show.add_argument("--config", required=True, help="path to the TOML config file")
    show.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    hist = twin_sub.add_parser("history", help="the stored samples of one point")
    hist.add_argument("--config", required=True, help="path to the TOML config file")
    hist.add_argument("point", metavar="POINT", help="point name, e.g. chiller1.supply_temp")
    hist.add_argument("--since", default="10m", help='how far back, as a duration like "10m" (default 10m)')
    hist.add_argument("--limit", type=int, default=None, help="at most this many samples")
    hist.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    outbox = twin_sub.add_parser("outbox", help="the cloud outbox: depth, oldest age, bytes, dropped")
    outbox.add_argument("--config", required=True, help="path to the TOML config file")
    outbox.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    events = twin_sub.add_parser("events", help="anomalies, device outages and other events, oldest first")
    events.add_argument("--config", required=True, help="path to the TOML config file")
    events.add_argument("--since", default="7d", help='how far back, as a duration like "1h" (default 7d)')
    events.add_argument("--limit", type=int, default=None, help="at most this many (the newest)")
    events.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    from edge_agent.remote import operator

    operator.add_parsers(sub)

    writes = twin_sub.add_parser("writes", help="every write attempt through the safety gate, oldest first")
    writes.add_argument("--config", required=True, help="path to the TOML config file")
    writes.add_argument("--since", default="7d", help='how far back, as a duration like "1h" (default 7d)')
    writes.add_argument("--limit", type=int, default=None, help="at most this many (the newest)")
    writes.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    _commission_parsers(sub)

    demo = sub.add_parser("demo", help="run a simulated plant and the agent against it, with a live view")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    demo.add_argument("--data-dir", default=None, help="where the demo twin goes (default: a temp folder)")
    return parser


def _commission_parsers(sub: Any) -> None:
    from edge_agent.commission.defaults import DEFAULT_DEPTH, DEFAULT_MAX_NODES, default_data_dir
    from edge_agent.config import OPCUA_SECURITY, PARITIES

    browse = sub.add_parser(
        "browse", help="list every Variable of an OPC UA server (read-only), or print a config block for it",
        description="Walk the server's Objects folder and list every Variable: its node id (nsu= form, usable as "
                    "points[].node), browse path, data type, whether it is writable, and its value and status. "
                    "Read-only: it only browses and reads, and never writes to the server.")
    browse.add_argument("endpoint", metavar="ENDPOINT", help="opc.tcp://host:port/path")
    browse.add_argument("--security", choices=OPCUA_SECURITY, default="None", help="security mode (default None)")
    browse.add_argument("--username", default=None, help="log in with this user name")
    browse.add_argument("--password-file", default=None,
                        help="file holding the password (its first line); never give a password on the command line")
    browse.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help=f"levels to walk below the root (default {DEFAULT_DEPTH})")
    browse.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES,
                        help=f"stop after this many nodes (default {DEFAULT_MAX_NODES})")
    browse.add_argument("--root", default=None, metavar="NODE",
                        help='start here instead of the Objects folder, e.g. "nsu=urn:plc;s=Line1"')
    browse.add_argument("--include-server", action="store_true",
                        help="also walk the standard Server object (status, capabilities, diagnostics), "
                             "left out by default")
    browse.add_argument("--timeout", default="5s", help='per request, as a duration (default "5s")')
    browse.add_argument("--data-dir", default=None,
                        help="where the client certificate for --security lives, in pki/ "
                             f"(default {default_data_dir()}; give the agent's data_dir to use the certificate "
                             "the server already trusts)")
    output = browse.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print a JSON array (node, path, type, writable, value, ...)")
    output.add_argument("--toml", metavar="DEVICE", default=None,
                        help="print a [[devices]] block named DEVICE with one point per variable "
                             "(writable ones commented out until they get min and max)")

    probe = sub.add_parser("probe", help="read a device once and show every way to decode it (read-only)")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True, metavar="PROTOCOL")
    modbus = probe_sub.add_parser(
        "modbus", help="read Modbus registers once and decode them in every type, byte and word order",
        description="Read COUNT registers (or bits) from ADDRESS once, over TCP (HOST:PORT) or RTU (--serial), and "
                    "show each address as int16/uint16 and each pair and quadruple as int32/uint32/float32 and "
                    "int64/uint64/float64 in every byte and word order, marking the plausible ones with *. "
                    "Read-only: it sends only read requests and never writes to the device.")
    modbus.add_argument("address_port", metavar="HOST:PORT", nargs="?", default=None,
                        help="Modbus TCP device (port 502 when left out)")
    modbus.add_argument("--serial", default=None, metavar="PORT", help="Modbus RTU serial port, e.g. /dev/ttyUSB0")
    modbus.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    modbus.add_argument("--parity", choices=PARITIES, default="E", help="RTU parity (default E)")
    modbus.add_argument("--stopbits", type=int, choices=(1, 2), default=1, help="RTU stop bits (default 1)")
    modbus.add_argument("--bytesize", type=int, choices=(7, 8), default=8, help="RTU data bits (default 8)")
    modbus.add_argument("--unit", type=int, default=1, help="unit (slave) id, 0..255 (default 1)")
    modbus.add_argument("--table", choices=("holding", "input", "coil", "discrete"), default="holding",
                        help="which table (default holding)")
    modbus.add_argument("--address", type=int, required=True, help="first address, 0-based")
    modbus.add_argument("--count", type=int, required=True, help="how many registers (or bits)")
    modbus.add_argument("--timeout", default="3s", help='as a duration (default "3s")')
    modbus.add_argument("--json", action="store_true",
                        help="print a JSON object with registers (raw) and decoded (address, type, word_order, "
                             "byte_order, value, plausible)")

"""``check-config`` (``--probe``), ``browse`` and ``probe modbus``: printing and usage checks; the work is in
:mod:`edge_agent.commission`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from edge_agent.cli.output import EXIT_FAIL, EXIT_OK
from edge_agent.config import load
from edge_agent.config.table import parse_duration
from edge_agent.errors import UsageError


def check(path: str, probe: bool = False) -> int:
    config = load(path)
    points = sum(len(d.points) for d in config.devices)
    print(f"{path}: ok ({len(config.devices)} devices, {points} points; twin at {config.twin_path})")
    if not probe:
        return EXIT_OK
    from edge_agent.commission.check import check_devices
    from edge_agent.commission.report import check_text

    checks = asyncio.run(check_devices(config))
    print(check_text(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAIL


def _duration(flag: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise UsageError(f'{flag}: expected a positive duration like "3s", got "{text}"')
    return seconds


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is None:
        return None
    if args.username is None:
        raise UsageError("--password-file needs --username")
    try:
        lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--password-file: cannot read {args.password_file}: {exc}") from exc
    if not lines or not lines[0]:
        raise UsageError(f"--password-file: {args.password_file} is empty; expected the password on its first line")
    return lines[0]


def browse(args: argparse.Namespace) -> int:
    from edge_agent.commission.browse import browse
    from edge_agent.commission.defaults import default_data_dir
    from edge_agent.commission.emit import device_block
    from edge_agent.commission.report import browse_json, browse_text
    from edge_agent.config import OpcUaDevice

    if not args.endpoint.startswith("opc.tcp://"):
        raise UsageError(f'ENDPOINT: expected an URL starting with "opc.tcp://", got "{args.endpoint}"')
    if args.toml is not None and not args.toml.strip():
        raise UsageError("--toml: expected a device name")
    if args.depth < 1 or args.max_nodes < 1:
        raise UsageError("--depth and --max-nodes: expected numbers of at least 1")
    device = OpcUaDevice(name=args.toml or "browse", protocol="opcua", endpoint=args.endpoint,
                         security=args.security, username=args.username, password=_password(args),
                         timeout=_duration("--timeout", args.timeout))
    if args.security != "None":  # show both certificates' thumbprints: the operator compares them
        logging.basicConfig(format="%(message)s")
        logging.getLogger("drivers").setLevel(logging.INFO)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    result = asyncio.run(browse(device, data_dir, root=args.root, depth=args.depth, max_nodes=args.max_nodes,
                                include_server=args.include_server))
    if args.json:
        print(json.dumps(browse_json(result), indent=1, ensure_ascii=False))
    elif args.toml is not None:
        print(device_block(args.toml, args.endpoint, result.variables, security=args.security,
                           username=args.username), end="")
    else:
        print(browse_text(result))
    if result.stopped:
        print(f"warning: {result.stopped}", file=sys.stderr)
    return EXIT_OK


def probe_modbus(args: argparse.Namespace) -> int:
    from edge_agent.commission.probe import ModbusTarget, parse_host_port, probe
    from edge_agent.commission.report import probe_json, probe_text

    if (args.address_port is None) == (args.serial is None):
        raise UsageError("probe modbus: give either HOST:PORT (TCP) or --serial PORT (RTU)")
    if not 0 <= args.unit <= 255:
        raise UsageError(f"--unit: expected 0..255, got {args.unit}")
    timeout = _duration("--timeout", args.timeout)
    if args.serial is not None:
        target = ModbusTarget(serial_port=args.serial, baudrate=args.baudrate, parity=args.parity,
                              stopbits=args.stopbits, bytesize=args.bytesize, unit=args.unit, timeout=timeout)
    else:
        host, port = parse_host_port(args.address_port)
        target = ModbusTarget(host=host, port=port, unit=args.unit, timeout=timeout)
    result = asyncio.run(probe(target, args.table, args.address, args.count))
    print(json.dumps(probe_json(result), indent=1) if args.json else probe_text(result))
    return EXIT_OK

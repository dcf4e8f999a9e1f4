"""Command line: argument parsing, exit codes and printing only; the work lives elsewhere.

``parsers`` holds every verb and flag, ``daemon`` runs the agent, ``views`` prints status and the
twin, ``commission`` browse and probe, ``output`` formats for the terminal.

Exit status: 0 success, 1 runtime failure, 2 bad config or bad usage, 3 (``status``) the agent
is not running.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.cli.commission import browse, check, probe_modbus
from edge_agent.cli.daemon import run
from edge_agent.cli.output import EXIT_CONFIG, EXIT_FAIL, EXIT_OK
from edge_agent.cli.parsers import parser
from edge_agent.cli.views import status, twin
from edge_agent.config import load
from edge_agent.errors import ConfigError, EdgeAgentError, UsageError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` command."""
    args = parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(load(args.config))
        if args.command == "check-config":
            return check(args.config, probe=args.probe)
        if args.command == "browse":
            return browse(args)
        if args.command == "probe":
            return probe_modbus(args)
        if args.command == "twin":
            return twin(args)
        if args.command == "status":
            return status(args.config, args.json)
        if args.command in ("keys", "command"):
            return _operator(args)
        if args.command == "demo":
            from edge_agent.demo.runner import run_demo

            return run_demo(duration=args.duration, data_dir=args.data_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    return EXIT_FAIL  # pragma: no cover - argparse rejects unknown commands


def _operator(args: argparse.Namespace) -> int:
    from edge_agent.remote import operator

    if args.command == "keys":
        private, public = operator.new_keys(args.name, Path(args.dir))
        print(f"private key {private} (keep it secret)\npublic key  {public} (put it in the gateway's "
              f"[[commands.operators]] public_key)")
        return EXIT_OK
    answer = operator.send(args)
    print(json.dumps(answer, indent=1, ensure_ascii=False))
    return EXIT_OK if answer.get("ok") is True else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Hostile input on the ``cmd`` topic (issue 11): what a flood of unsigned junk and replays may cost.

Anyone allowed to publish on ``cmd`` can send anything, as fast as the broker relays it. The agent
runs in-process (real mosquitto with mutual TLS, the fake device of tests/fakes.py); the flood comes
from ``mosquitto_pub`` in its own process. The bounds asserted here are coarse (an order of magnitude
under what the agent did before); the figures are printed, and bench/bench_hostile.py measures them
per 100 MB for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.store.views import TwinView
from tests.commanding import CMD, PREFIX, RESPONSE, Keys, Operator, config_text, envelope, started
from tests.flood import LoopWatch, disk_bytes, junk, metered_logs, publish
from tests.helpers import wait_for
from tests.mqtt_broker import Broker, Message, Pki, Recorder

MB = 1024 * 1024


def command_records(agent: Agent) -> list[dict[str, Any]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return [e for e in twin.events() if e["kind"] == "command"]


async def settle(agent: Agent) -> None:
    """Everything the agent holds in memory stored: readings, then events and their outbox copies."""
    assert agent.writer is not None
    await agent.flush()
    await agent.writer.store_records()


def answer_with_id(command_id: str) -> Any:
    def find(messages: list[Message]) -> dict[str, Any] | None:
        for m in messages:
            try:
                body = m.json()
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("id") == command_id:
                return body
        return None
    return find


async def test_unsigned_flood_costs_bounded_disk_and_log_and_signed_commands_get_through(
        tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    """Before: 30 such 2 MiB messages grew data_dir by 116 MB and the log by 63 MB."""
    text = config_text(tmp_path, broker, pki, keys, max_payload="4MiB", interval="1s")
    big = tmp_path / "junk.json"
    big.write_bytes(junk(2 * MB))
    quick = tmp_path / "quick.txt"  # small junk of every kind: bad signatures of real operators, strangers, garbage
    quick.write_bytes(b"\n".join([junk(2000, operator="alice"), junk(3000, operator_bytes=2000), b"{not json",
                                  junk(500, operator="carol", name="write")] * 125) + b"\n")
    offered = 12 * len(big.read_bytes()) + quick.stat().st_size
    # Only the answers: a recorder on the cmd topic would spend this process's time on the flood too.
    with Recorder(broker, f"{RESPONSE}/#") as recorder, metered_logs() as logs:
        op = Operator(recorder)
        # The files as a clean stop leaves them (SQLite's WAL checkpointed: its size is a bounded
        # high-water mark of a few MB, whatever the input), before and after the flood.
        agent = await started(tmp_path, text)
        try:
            assert (await op.ask(envelope(keys, "carol", "ping")))["ok"] is True
        finally:
            await agent.stop()
        data = agent.config.agent.data_dir
        disk0, log0, records0 = disk_bytes(data), logs.bytes, len(command_records(agent))
        agent = await started(tmp_path, text)
        try:
            watch = LoopWatch().start()
            flooders = [publish(broker, CMD, file=big, repeat=12), publish(broker, CMD, lines=quick)]
            await wait_for(lambda: agent.commands is not None and agent.commands.intake.received > 20,
                           what="the flood arriving")
            began = time.monotonic()
            pong = await op.ask(envelope(keys, "carol", "ping"), timeout=30)
            latency = time.monotonic() - began
            assert pong["ok"] is True, pong
            # a write waits for its read-back at the next poll (interval 1 s): answered, not timed
            signed = await op.ask(envelope(keys, "bob", "write", {"point": "dev.sp", "value": 6}), timeout=30)
            assert signed["ok"] is True and signed["result"]["readback"] == 6, signed
            handler = agent.commands
            assert handler is not None
            await wait_for(lambda: all(f.poll() is not None for f in flooders), timeout=60, what="the flood sent")
            assert [f.returncode for f in flooders] == [0, 0], [f.stderr.read() for f in flooders if f.stderr]
            await wait_for(lambda: handler.intake.received >= 12 + 500 + 2, timeout=60,
                           what="every flood message taken in")
            stall = await watch.stop()
            handler.intake.summary(force=True)  # the interval's one summary line, now rather than in a minute
            await settle(agent)
            records = command_records(agent)[records0:]
            assert agent.status().dead_parts == () and agent.runners["dev"].status.state == "up"
        finally:
            await agent.stop()
        grown, logged = disk_bytes(data) - disk0, logs.bytes - log0
        print(f"\nflood: {offered / MB:.1f} MB offered ({handler.intake.received} messages), "
              f"{handler.intake.dropped} dropped unread, {handler.intake.suppressed} refused without a record; "
              f"data_dir +{grown / 1024:.0f} KiB, log +{logged / 1024:.1f} KiB ({logs.lines} lines); "
              f"longest loop stall {stall * 1000:.0f} ms; signed ping answered in {latency:.2f} s")
        # Bounded: a record per refusal only within the budget (a burst of 60), each of a few hundred
        # bytes; no field copied whole; a handful of log lines.
        assert grown < 3 * MB, f"data_dir grew {grown} bytes for {offered} bytes of junk"
        assert logged < 16 * 1024, "\n".join(logs.messages[-20:])
        assert len(records) <= 70, len(records)
        biggest = max(len(json.dumps(r)) for r in records)
        assert biggest < 4096, max(records, key=lambda r: len(json.dumps(r)))
        stranger = next(r for r in records if r["detail"].get("fields", {}).get("operator", {}).get("bytes")
                        == 700_000)
        assert len(stranger["detail"]["operator"]) <= 35 and stranger["detail"]["sha256"]


async def test_a_signed_command_inside_a_burst_of_quick_junk_is_answered(tmp_path: Path, broker: Broker, pki: Pki,
                                                                         keys: Keys) -> None:
    """Before: of 500 quick messages 468 were dropped unanswered, a real command in the burst with them."""
    text = config_text(tmp_path, broker, pki, keys, interval="1s")
    command = envelope(keys, "bob", "write", {"point": "dev.sp", "value": 7})
    lines = [junk(400, operator="alice") for _ in range(250)] + [json.dumps(command).encode()] + [
        junk(400, operator_bytes=300) for _ in range(250)]
    burst = tmp_path / "burst.txt"
    burst.write_bytes(b"\n".join(lines) + b"\n")
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, text)
        try:
            await wait_for(lambda: agent.last_value("dev.sp"), what="a first reading")
            sender = publish(broker, CMD, lines=burst)
            answer = await recorder.wait_for_async(answer_with_id(command["id"]), timeout=20, topic=RESPONSE)
            assert answer["ok"] is True and answer["result"]["written"] == 7, answer
            await wait_for(lambda: sender.poll() is not None, what="the burst sent")
            handler = agent.commands
            assert handler is not None
            await wait_for(lambda: handler.intake.received >= 501, what="every message of the burst taken in")
            assert handler.intake.refused == 500 and handler.intake.dropped == 0
        finally:
            await agent.stop()


async def test_replays_count_against_the_limiter_and_are_not_parsed_again(tmp_path: Path, broker: Broker, pki: Pki,
                                                                          keys: Keys) -> None:
    """Before: one captured command replayed 500 times gave 500 audit records and 500 responses, and a
    replayed 4 MiB command was parsed and verified every time."""
    text = config_text(tmp_path, broker, pki, keys, max_payload="4MiB", interval="1s")
    with Recorder(broker, f"{PREFIX}/#") as recorder, metered_logs() as logs:
        agent = await started(tmp_path, text)
        handler = agent.commands
        assert handler is not None
        try:
            captured = json.dumps(envelope(keys, "carol", "ping", validity=600)).encode()
            assert (await Operator(recorder).ask(captured))["ok"] is True
            await settle(agent)
            records0, lines0 = len(command_records(agent)), logs.lines
            for _ in range(500):
                handler.submit(captured, None, None)
            await wait_for(lambda: handler.intake.refused >= 500, what="500 replays refused")
            await settle(agent)
            replayed = [r for r in command_records(agent)[records0:] if r["state"] == "replayed"]
            assert 30 <= len(replayed) <= 61, len(replayed)  # the answer budget's burst, not 500
            assert logs.lines - lines0 <= 3, logs.messages[lines0:]

            big = json.dumps(envelope(keys, "alice", "ping", {"pad": "x" * (3 * MB)}, validity=600)).encode()
            first = await handler.handle(big)
            assert first is not None and first.body["error"]["code"] == "bad_args"  # verified, claimed, refused
            parsed = handler.intake.parsed
            began = time.monotonic()
            for _ in range(20):
                await handler.handle(big)
            print(f"\n20 replays of a {len(big) / MB:.1f} MB command: {time.monotonic() - began:.3f} s")
            assert handler.intake.parsed == parsed, "a replay of an accepted command was parsed again"
        finally:
            await agent.stop()

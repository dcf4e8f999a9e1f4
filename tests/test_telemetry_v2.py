"""Telemetry version 2 (``mqtt.telemetry_version = 2``): a run of samples per device read (issue 13).

The encoder's exact output (runs, mixed qualities, non-finite, boolean and string values, gaps),
the v1 encoder's two paths writing the same bytes, the config key, a real outbox carrying gap
records, and the agent end to end against mosquitto with mosquitto_sub as the subscriber.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from edge_agent.agent import Agent
from edge_agent.cloud import payloads
from edge_agent.errors import ConfigError
from edge_agent.store.messages import Draft, Gap, OutboxLimits, Stamp
from edge_agent.store.outbox import Outbox
from edge_agent.store.views import read_stats
from tests import builders
from tests.fakes import FakePlant
from tests.mqtt_broker import AGENT_CN, Broker, Pki, Recorder
from tests.schemas import (
    DIALECT,
    check_schema_subset,
    load_schema,
    telemetry_samples,
    telemetry_schema,
    validate,
)

PREFIX = "edge/plant-a/gw-01"
TELEMETRY = f"{PREFIX}/telemetry"


def v2(samples: list[Reading], stamp: Stamp | None = None, encoder: payloads.CompactTelemetryEncoder | None = None,
       ) -> dict[str, Any]:
    """A v2 payload, parsed, after checking it against the schema."""
    body: dict[str, Any] = json.loads((encoder or payloads.CompactTelemetryEncoder("gw-01")).encode(
        samples, stamp or Stamp(1)))
    assert validate(body, load_schema("telemetry.v2")) == [], body
    return body


# ------------------------------------------------------------------------------------ the encoder


def test_runs_of_one_ts_become_one_entry_each_in_order() -> None:
    samples = [Reading("dev01.p000", 20.5, "good", 100.25), Reading("dev01.p001", 3, "good", 100.25),
               Reading("dev02.p000", 7.0, "good", 100.5), Reading("dev01.p000", 20.75, "good", 100.25)]
    payload = payloads.CompactTelemetryEncoder("gw-01").encode(samples, Stamp(7))
    # the pinned contract, byte for byte: another helper's subscriber parses it
    assert payload == (b'{"v":2,"gateway":"gw-01","seq":7,"reads":['
                       b'{"ts":100.25,"names":["dev01.p000","dev01.p001"],"values":[20.5,3],"quality":"good"},'
                       b'{"ts":100.5,"names":["dev02.p000"],"values":[7.0],"quality":"good"},'
                       b'{"ts":100.25,"names":["dev01.p000"],"values":[20.75],"quality":"good"}]}')
    body = v2(samples, Stamp(7))
    # a ts seen again later is a new read: its own entry, never merged with the first
    assert [r["ts"] for r in body["reads"]] == [100.25, 100.5, 100.25]
    assert telemetry_samples(body) == [(r.point, r.ts, r.value, r.quality) for r in samples]


def test_entries_keep_a_read_whole_up_to_the_limit_and_split_it_beyond() -> None:
    encoder = payloads.CompactTelemetryEncoder("gw-01")
    reads = [Reading(f"d{d}.p{p}", d + p / 10, "good", 100.0 + d) for d in range(2) for p in range(5)]
    assert [count for _, count in encoder.entries(reads, 7)] == [5, 5]
    split = encoder.entries(reads, 3)
    assert [count for _, count in split] == [3, 2, 3, 2]
    body = json.loads(encoder.encode_entries([text for text, _ in split], Stamp(3)))
    assert [r["ts"] for r in body["reads"]] == [100.0, 100.0, 101.0, 101.0]
    assert telemetry_samples(body) == [(r.point, r.ts, r.value, r.quality) for r in reads]
    assert encoder.encode(reads, Stamp(3)) == encoder.encode_entries([t for t, _ in encoder.entries(reads, 10)],
                                                                       Stamp(3))


def test_mixed_qualities_are_an_array_and_agreeing_ones_a_string() -> None:
    samples = [Reading("a", 1.0, "good", 5.0), Reading("b", 2.0, "bad", 5.0), Reading("c", 3.0, "stale", 5.0),
               Reading("d", 4.0, "uncertain", 6.0), Reading("e", 5.0, "uncertain", 6.0)]
    body = v2(samples)
    assert [r["quality"] for r in body["reads"]] == [["good", "bad", "stale"], "uncertain"]
    assert telemetry_samples(body) == [(r.point, r.ts, r.value, r.quality) for r in samples]


def test_non_finite_none_bool_and_string_values_as_version_1_writes_them() -> None:
    samples = [Reading("x.nan", math.nan, "bad", 9.0), Reading("x.inf", math.inf, "good", 9.0),
               Reading("x.ninf", -math.inf, "good", 9.0), Reading("x.none", None, "bad", 9.0),
               Reading("x.on", True, "good", 9.0), Reading("x.off", False, "good", 9.0),
               Reading("x.text", 'say "hi", \u00e9', "good", 9.0), Reading("x.big", 10**20, "good", 9.0),
               Reading("x.neg0", -0.0, "good", 9.0), Reading("x.tiny", 2.5e-300, "good", 9.0)]
    payload = payloads.CompactTelemetryEncoder("gw-01").encode(samples, Stamp(3))
    assert b'"values":[null,null,null,null,true,false,"say \\"hi\\", \xc3\xa9",100000000000000000000,-0.0,2.5e-300]' \
        in payload
    body = v2(samples, Stamp(3))
    v1 = json.loads(payloads.TelemetryEncoder("gw-01").encode(samples, Stamp(3)))
    assert telemetry_samples(body) == telemetry_samples(v1)  # the same values, however they are grouped
    assert body["reads"][0]["quality"] == ["bad", "good", "good", "bad", "good", "good", "good", "good", "good",
                                           "good"]


def test_gap_record_and_empty_message() -> None:
    gapped = v2([Reading("a", 1.5, "good", 1.0)], Stamp(9, Gap(2, 5, 3, 40)))
    assert gapped["gap"] == {"from_seq": 2, "to_seq": 5, "messages": 3, "samples": 40}
    assert (gapped["v"], gapped["gateway"], gapped["seq"]) == (2, "gw-01", 9)
    assert "gap" not in v2([Reading("a", 1.5, "good", 1.0)], Stamp(10))
    assert v2([], Stamp(11)) == {"v": 2, "gateway": "gw-01", "seq": 11, "reads": []}


def test_names_cache_is_bounded_and_a_forgotten_entry_comes_back_right() -> None:
    encoder = payloads.CompactTelemetryEncoder("gw-01", names_cache=2)
    reads = [[Reading(f"d{d}.p{p}", float(p), "good", float(d)) for p in range(3)] for d in range(4)]
    first = [v2(read, encoder=encoder) for read in reads]
    again = [v2(read, encoder=encoder) for read in reversed(reads)]  # the first two were evicted meanwhile
    assert [b["reads"][0]["names"] for b in first] == [[f"d{d}.p0", f"d{d}.p1", f"d{d}.p2"] for d in range(4)]
    assert again == list(reversed(first))


def test_version_1_bulk_path_writes_the_bytes_of_the_per_sample_path() -> None:
    """Floats only go through the C encoder in bulk; a string or NaN sends the message the per-sample way."""
    floats = [Reading("p.a", 23.399999618530273, "good", 1_700_000_000.125), Reading("p.b", 7, "bad", 1.0),
              Reading("p.c", True, "uncertain", 1.0), Reading("p.d", None, "stale", 1)]
    assert payloads.TelemetryEncoder("gw").encode(floats, Stamp(2, Gap(1, 1, 1, 4))) == (
        b'{"v":1,"gateway":"gw","seq":2,"gap":{"from_seq": 1, "to_seq": 1, "messages": 1, "samples": 4},"points":['
        b'{"name":"p.a","ts":1700000000.125,"value":23.399999618530273,"quality":"good"},'
        b'{"name":"p.b","ts":1.0,"value":7,"quality":"bad"},'
        b'{"name":"p.c","ts":1.0,"value":true,"quality":"uncertain"},'
        b'{"name":"p.d","ts":1.0,"value":null,"quality":"stale"}]}')  # ts 1 equals 1.0: its first text
    mixed = [*floats, Reading("p.e", "a,b", "good", 2.0), Reading("p.f", math.nan, "bad", 2.0)]
    body = json.loads(payloads.TelemetryEncoder("gw").encode(mixed, Stamp(3)))
    assert [p["value"] for p in body["points"]] == [23.399999618530273, 7, True, None, "a,b", None]


def test_telemetry_samples_refuses_arrays_that_are_not_parallel() -> None:
    body = {"v": 2, "gateway": "gw", "seq": 1, "reads": [{"ts": 1.0, "names": ["a", "b"], "values": [1.0],
                                                          "quality": "good"}]}
    assert validate(body, load_schema("telemetry.v2")) == []  # JSON Schema cannot say "same length"
    with pytest.raises(ValueError, match=r"reads\[0\]: names, values and quality differ in length \(2, 1, 1\)"):
        telemetry_samples(body)


# ------------------------------------------------------------------------------------ the schema


def test_v2_schema_file_and_what_it_refuses() -> None:
    schema = load_schema("telemetry.v2")
    assert schema["$schema"] == DIALECT and schema["$id"] == "urn:edge-agent:payload:telemetry:v2"
    assert schema["properties"]["v"]["const"] == 2 and schema["required"] == ["v", "gateway", "seq", "reads"]
    assert schema["properties"]["reads"]["items"]["required"] == ["ts", "names", "values", "quality"]
    assert schema["properties"]["gap"] == load_schema("telemetry")["properties"]["gap"]
    assert "{topic_prefix}/{site}/{gateway_id}/telemetry" in schema["description"]
    assert check_schema_subset(schema) == []
    good = v2([Reading("a", 1.0, "good", 1.0)])
    read = good["reads"][0]
    cases = {
        "$.v: expected 2, got 1": {**good, "v": 1},
        "$: missing required 'reads'": {k: v for k, v in good.items() if k != "reads"},
        "$: unexpected property 'points'": {**good, "points": []},
        "$.reads[0].values[0]: expected number or boolean or string or null, got list [1]":
            {**good, "reads": [{**read, "values": [[1]]}]},
        "$.reads[0].names[0]: expected at least 1 characters, got ''": {**good, "reads": [{**read, "names": [""]}]},
        "$.reads[0].quality: matches none of anyOf ($.reads[0].quality: expected one of ['good', 'uncertain', "
        "'bad', 'stale'], got 'fine' | $.reads[0].quality: expected array, got str 'fine')":
            {**good, "reads": [{**read, "quality": "fine"}]},
        "$.reads[0]: missing required 'ts'": {**good, "reads": [{k: v for k, v in read.items() if k != "ts"}]},
    }
    for message, instance in cases.items():
        assert validate(instance, schema) == [message]
    bad_item = validate({**good, "reads": [{**read, "quality": ["good", "fine"]}]}, schema)
    assert len(bad_item) == 1 and "$.reads[0].quality[1]: expected one of" in bad_item[0]
    assert telemetry_schema(good) == schema and telemetry_schema({"v": 1}) == load_schema("telemetry")


# ------------------------------------------------------------------------------------ the config key


def config_doc(tmp_path: Path, pki: Pki, port: int, **mqtt: Any) -> builders.Doc:
    dev = builders.modbus("dev", builders.numbered("dev.p", 5), interval="100ms")
    settings = {"publish_interval": "100ms", "twin_interval": "200ms", "retry_min": "100ms", "retry_max": "500ms",
                **mqtt}
    section = builders.mqtt(pki, port, **settings)
    return builders.config(tmp_path / "data", id=AGENT_CN, site="plant-a", twin={"flush_interval": "50ms"},
                           mqtt=section, devices=[dev])


def test_telemetry_version_defaults_to_1_and_accepts_2(tmp_path: Path, pki: Pki) -> None:
    default = builders.load(config_doc(tmp_path, pki, 8883), tmp_path / "a.toml")
    chosen = builders.load(config_doc(tmp_path, pki, 8883, telemetry_version=2), tmp_path / "b.toml")
    assert default.mqtt is not None and chosen.mqtt is not None
    assert (default.mqtt.telemetry_version, chosen.mqtt.telemetry_version) == (1, 2)


@pytest.mark.parametrize(("value", "shown"), [(3, "3"), (0, "0"), ("2", '"2"'), (True, "true"), (2.0, "2.0")])
def test_telemetry_version_other_values_are_config_errors(tmp_path: Path, pki: Pki, value: Any, shown: str) -> None:
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError) as info:
        builders.load(config_doc(tmp_path, pki, 8883, telemetry_version=value), path)
    assert info.value.problems == [f"{path}: mqtt.telemetry_version: expected 1 or 2, got {shown}"]


# ------------------------------------------------------------------------------------ a real outbox


def test_real_outbox_stamps_seq_and_gap_into_v2_payloads(tmp_path: Path) -> None:
    """The outbox drops the oldest telemetry when full; the next v2 message reports it."""
    encoder = payloads.CompactTelemetryEncoder("gw-01")

    def draft(n: int) -> Draft:
        chunk = [Reading(f"d.p{i}", float(n * 10 + i), "good", float(n)) for i in range(n)]
        return Draft("telemetry", TELEMETRY, lambda stamp: encoder.encode(chunk, stamp), samples=len(chunk))

    with Outbox.open(tmp_path / "outbox.db", limits=OutboxLimits(max_rows=2, event_share=0.5)) as outbox:
        outbox.append([draft(1), draft(2)])
        outbox.append([draft(3)])  # drops seq 1
        outbox.append([draft(4)])  # carries gap 1..1, drops seq 2
        delivered = []
        while batch := outbox.take(10):
            delivered += [json.loads(m.payload) for m in batch]
            outbox.ack(m.id for m in batch)
    assert [b["seq"] for b in delivered] == [3, 4]
    assert all(validate(b, load_schema("telemetry.v2")) == [] for b in delivered)
    assert "gap" not in delivered[0]
    assert delivered[1]["gap"] == {"from_seq": 1, "to_seq": 1, "messages": 1, "samples": 1}
    assert [len(telemetry_samples(b)) for b in delivered] == [3, 4]


# ------------------------------------------------------------------------------------ end to end


def history(data_dir: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{data_dir / 'twin.db'}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute("SELECT point, ts, value, quality FROM history ORDER BY rowid")]
    finally:
        conn.close()


async def test_agent_v2_end_to_end_mosquitto_sub_gets_every_sample(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    """The agent with telemetry_version = 2 and max_samples = 3 (reads of 5 samples are split across
    messages) against mosquitto; mosquitto_sub, a subscriber this project did not write, receives it."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.fail("mosquitto_sub is not installed (apt-get install mosquitto-clients; ./dev.sh installs it)")
    with Recorder(broker, f"{PREFIX}/probe") as probe:  # a retained probe: when it arrives, the sub is subscribed
        await asyncio.to_thread(probe.publish, f"{PREFIX}/probe", b"{}", 1, True)
    sub = await asyncio.create_subprocess_exec(
        binary, "--cafile", str(pki.ca_cert), "--cert", str(pki.operator_cert), "--key", str(pki.operator_key),
        "-h", "localhost", "-p", str(broker.port), "-t", f"{PREFIX}/#", "-q", "1", "-F", "%t %p", "-W", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=1 << 22)
    lines: list[tuple[str, Any]] = []

    async def read_line() -> None:
        assert sub.stdout is not None
        line = await asyncio.wait_for(sub.stdout.readline(), 30)
        assert line, f"mosquitto_sub ended: {(await sub.stderr.read()).decode() if sub.stderr else ''}"
        topic, payload = line.decode().rstrip("\n").split(" ", 1)
        lines.append((topic, json.loads(payload)))

    def bodies() -> list[dict[str, Any]]:
        return [b for t, b in lines if t == TELEMETRY]

    # three reads (of 5 samples, every 100 ms) gather per publish interval; each read is longer
    # than a message may be, so it is split: 3 samples in one message, 2 in the next
    cfg = builders.load(config_doc(tmp_path, pki, broker.port, telemetry_version=2, max_samples=3,
                                   publish_interval="300ms"),
                        tmp_path / "agent.toml")
    agent = Agent(cfg, driver_factory=FakePlant(counting=True, accepts_writes=False).driver)
    try:
        await read_line()
        assert lines[0][0] == f"{PREFIX}/probe"
        await agent.start()
        try:
            while sum(len(telemetry_samples(b)) for b in bodies()) < 60:
                await read_line()
        finally:
            await agent.stop()
        last_seq = read_stats(tmp_path / "data" / "outbox.db").next_telemetry_seq - 1
        while max(b["seq"] for b in bodies()) < last_seq:  # stop() had them acknowledged; they may still be on the way
            await read_line()
    finally:
        if sub.returncode is None:
            sub.terminate()
        await sub.wait()
    received = {b["seq"]: b for b in bodies()}
    assert sorted(received) == list(range(1, last_seq + 1))
    for body in received.values():
        assert validate(body, load_schema("telemetry.v2")) == [], body
        assert (body["v"], body["gateway"]) == (2, AGENT_CN)
    counts = [len(telemetry_samples(received[seq])) for seq in sorted(received)]
    assert max(counts) == 3 and all(0 < c <= 3 for c in counts)
    # a read split across two messages: the same ts ends one message and starts the next
    assert any(received[s]["reads"][-1]["ts"] == received[s + 1]["reads"][0]["ts"] for s in sorted(received)[:-1])
    got = [s for seq in sorted(received) for s in telemetry_samples(received[seq])]
    assert got == history(tmp_path / "data") and len(got) >= 60

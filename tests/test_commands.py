"""Signed remote commands against a real mosquitto with mutual TLS and an in-process agent.

The agent runs with the fake device of tests/fakes.py, which implements the Driver interface (its
writes land in the test's FakePlant, read back on the next poll). Commands are signed here with
``cryptography`` directly, with ``openssl pkeyutl`` (a signer that is not this project), and by the
``edge-agent command`` CLI. Every response is awaited on the request's own Response Topic and
matched by Correlation Data.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.store.views import TwinView
from tests import builders
from tests.commanding import (
    CMD,
    EVENTS,
    PREFIX,
    RESPONSE,
    UNREACHABLE,
    Keys,
    Operator,
    audit_record,
    config_text,
    envelope,
    fake_plant,
    started,
)
from tests.helpers import wait_for
from tests.mqtt_broker import Broker, Message, Pki, Recorder, publish_properties
from tests.onnx_models import zscore_model
from tests.unavailable import unavailable

# ----------------------------------------------------------------------------------- rejections


async def test_every_rejection_answered_with_its_code_and_audited(tmp_path: Path, broker: Broker, pki: Pki,
                                                                  keys: Keys) -> None:
    plant = fake_plant()
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys), plant)
        op = Operator(recorder)
        try:
            good = envelope(keys, "carol", "ping")
            assert (await op.ask(good))["ok"] is True
            no_sig = {k: v for k, v in envelope(keys, "carol", "ping").items() if k != "sig"}
            wrong_type = {**envelope(keys, "carol", "ping"), "args": [1]}
            tampered = {**envelope(keys, "bob", "write", {"point": "dev.sp", "value": 6}), "args":
                        {"point": "dev.sp", "value": 20}}
            cases: list[tuple[str, bytes | dict[str, Any], str | None]] = [
                ("bad_json", b"{not json", None),
                ("bad_json", b"[1, 2]", None),
                ("bad_json", b'{"id": NaN}', None),
                ("missing_field", no_sig, no_sig["id"]),
                ("bad_field", wrong_type, wrong_type["id"]),
                ("unknown_operator", envelope(keys, "mallory", "ping"), None),
                ("bad_signature", envelope(keys, "alice", "get_config", signer="mallory"), None),
                ("bad_signature", tampered, None),
                ("bad_validity", envelope(keys, "carol", "ping", validity=7200), None),
                ("not_yet_valid", envelope(keys, "carol", "ping", issued=time.time() + 600), None),
                ("expired", envelope(keys, "carol", "ping", issued=time.time() - 600), None),
                ("replayed", good, None),
                ("unknown_command", envelope(keys, "alice", "shell", {"cmd": "id"}), None),
                ("forbidden", envelope(keys, "carol", "write", {"point": "dev.sp", "value": 6}), None),
                ("forbidden", envelope(keys, "bob", "get_config"), None),
                ("bad_args", envelope(keys, "carol", "history", {"point": "dev.sp", "limit": "many"}), None),
                ("bad_args", envelope(keys, "carol", "read", {"points": ["nope"]}), None),
                ("bad_args", envelope(keys, "bob", "write", {"point": "dev.sp"}), None),
                ("too_large", envelope(keys, "alice", "set_config", {"config": "#" * 70_000}), None),
            ]
            for code, payload, _ in cases:
                answer = await op.ask(payload)
                expected_id = payload.get("id") if isinstance(payload, dict) and code != "too_large" else None
                assert answer["v"] == 1 and answer["ok"] is False and answer["id"] == expected_id, (code, answer)
                assert answer["error"]["code"] == code, (code, answer)
                assert answer["error"]["message"]
                event = await audit_record(agent, recorder, expected_id, code)
                assert event["source"] == "commands" and event["detail"]["ok"] is False
            # who did what: an authenticated refusal names the operator and the command
            forbidden = await audit_record(agent, recorder, cases[13][1]["id"], "forbidden")  # type: ignore[index]
            assert (forbidden["detail"]["operator"], forbidden["detail"]["command"]) == ("carol", "write")
            assert forbidden["detail"]["role"] == "viewer" and forbidden["detail"]["args"]["point"] == "dev.sp"
            # without a Response Topic the answer goes to .../cmd/response
            plain = await op.ask(envelope(keys, "carol", "ping"), reply=False)
            assert plain["ok"] is True and plain["result"]["pong"] is True
            # nothing crashed: the agent still answers and its device is still up
            assert (await op.ask(envelope(keys, "carol", "status")))["result"]["devices"][0]["state"] == "up"
            assert plant.device("dev").values.get("dev.sp") == 5.0  # the tampered write never reached the device
        finally:
            await agent.stop()


async def test_roles_viewer_operator_admin(tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys))
        op = Operator(recorder)
        try:
            viewer = {"ping": {}, "status": {}, "read": {"points": ["dev.pv"]}, "history": {"point": "dev.pv"},
                      "events": {}, "audit": {"since": "1h"}}
            operator = {"write": {"point": "dev.sp", "value": 6}, "set_mode": {"mode": "auto"}, "ack": {"event": 1}}
            admin = {"get_config": {}, "reload": {}, "restart_driver": {"device": "dev"}}
            for name, args in viewer.items():
                answer = await op.ask(envelope(keys, "carol", name, args))
                assert answer["ok"] is True, (name, answer)
            for name, args in {**operator, **admin}.items():
                answer = await op.ask(envelope(keys, "carol", name, args))
                assert answer["error"]["code"] == "forbidden", (name, answer)
            for name, args in admin.items():
                answer = await op.ask(envelope(keys, "bob", name, args))
                assert answer["error"]["code"] == "forbidden", (name, answer)
            # operator commands by the operator: no optimiser here, and event 1 must exist first
            assert (await op.ask(envelope(keys, "bob", "set_mode", {"mode": "auto"})))["error"]["code"] == "unavailable"
            agent.record_event({"ts": time.time(), "source": "test", "kind": "alarm", "state": "raised",
                                "message": "high level"})
            twin = TwinView.open(agent.config.twin_path)
            alarm = await wait_for(lambda: [e for e in twin.events() if e["kind"] == "alarm"], what="alarm stored")
            acked = await op.ask(envelope(keys, "bob", "ack", {"event": alarm[0]["id"]}))
            assert acked["ok"] and acked["result"]["acked_by"] == "bob", acked
            assert (await op.ask(envelope(keys, "bob", "ack", {"event": 10**6})))["error"]["code"] == "bad_args"
            await wait_for(lambda: [e for e in twin.events() if e["kind"] == "alarm" and e["acked_by"] == "bob"],
                           what="the ack in the twin")
            # the admin can do everything
            for name, args in {**viewer, **admin}.items():
                answer = await op.ask(envelope(keys, "alice", name, args))
                assert answer["ok"] is True, (name, answer)
            config_answer = await op.ask(envelope(keys, "alice", "get_config"))
            assert config_answer["result"]["config"] == (tmp_path / "agent.toml").read_text()
            readings = (await op.ask(envelope(keys, "carol", "read", {"points": ["dev.pv"]})))["result"]
            assert [(r["name"], r["value"], r["quality"]) for r in readings] == [("dev.pv", 5.0, "good")]
            history = (await op.ask(envelope(keys, "carol", "history", {"point": "dev.pv", "since": "1h"})))["result"]
            assert history and all(h["value"] == 5.0 for h in history)
            audit = (await op.ask(envelope(keys, "carol", "audit")))["result"]
            assert any(c["detail"]["operator"] == "bob" and c["detail"]["command"] == "ack" for c in audit["commands"])
        finally:
            await agent.stop()


async def test_replayed_id_refused_after_an_agent_restart(tmp_path: Path, broker: Broker, pki: Pki,
                                                           keys: Keys) -> None:
    text = config_text(tmp_path, broker, pki, keys)
    command = envelope(keys, "carol", "ping", validity=600)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        op = Operator(recorder)
        agent = await started(tmp_path, text)
        try:
            assert (await op.ask(command))["ok"] is True
        finally:
            await agent.stop()
        agent = await started(tmp_path, text)
        try:
            answer = await op.ask(command)
            assert answer["error"]["code"] == "replayed" and answer["id"] == command["id"]
            await audit_record(agent, recorder, command["id"], "replayed")
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- writes


async def test_write_goes_through_the_gate_and_answers_verdict_and_readback(tmp_path: Path, broker: Broker,
                                                                             pki: Pki, keys: Keys) -> None:
    plant = fake_plant()
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys), plant)
        op = Operator(recorder)
        try:
            await wait_for(lambda: agent.last_value("dev.sp"), what="a first reading")
            applied = await op.ask(envelope(keys, "bob", "write", {"point": "dev.sp", "value": 7.5}))
            assert applied["ok"] is True, applied
            verdict = applied["result"]
            assert (verdict["result"], verdict["written"], verdict["readback"]) == ("applied", 7.5, 7.5)
            assert (verdict["source"], verdict["actor"], verdict["old"]) == ("operator", "bob", 5.0)
            assert plant.device("dev").values["dev.sp"] == 7.5
            too_high = await op.ask(envelope(keys, "bob", "write", {"point": "dev.sp", "value": 50}))
            assert too_high["ok"] is False and too_high["error"]["code"] == "rejected"
            detail = too_high["error"]["detail"]
            assert detail["result"] == "rejected" and detail["written"] is None
            assert plant.device("dev").values["dev.sp"] == 7.5
            twin = TwinView.open(agent.config.twin_path)
            writes = await wait_for(lambda: twin.writes() if len(twin.writes()) >= 2 else None, what="writes stored")
            assert [(w["actor"], w["source"], w["result"]) for w in writes] == [
                ("bob", "operator", "applied"), ("bob", "operator", "rejected")]
        finally:
            await agent.stop()


async def test_ack_of_an_override_event_lets_automatic_writes_resume(tmp_path: Path, broker: Broker, pki: Pki,
                                                                      keys: Keys) -> None:
    """dev.sp changes at the device (not through the gate): the override event is published, status shows
    the hold, automatic writes are refused and operator writes pass, until bob acknowledges the event."""
    plant = fake_plant()
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys), plant)
        op = Operator(recorder)
        try:
            await wait_for(lambda: agent.gate.overrides.known.get("dev.sp") == 5.0, what="the gate's baseline")
            plant.device("dev").values["dev.sp"] = 9.0  # someone at the device
            [raised] = await recorder.wait_for_async(
                lambda ms: [m.json() for m in ms if m.json().get("type") == "override"], topic=EVENTS)
            assert (raised["point"], raised["old"], raised["new"], raised["state"]) == ("dev.sp", 5.0, 9.0, "raised")
            status = (await op.ask(envelope(keys, "carol", "status")))["result"]
            assert [(o["point"], o["event"]) for o in status["overrides"]] == [("dev.sp", raised["id"])]
            refused = await agent.gate.request("dev.sp", 10.0, source="optimizer")
            assert refused.result == "rejected" and "held after an operator override" in refused.reason
            written = await op.ask(envelope(keys, "bob", "write", {"point": "dev.sp", "value": 10.0}))
            assert written["ok"] is True and written["result"]["result"] == "applied", written
            acked = await op.ask(envelope(keys, "bob", "ack", {"event": raised["id"]}))
            assert acked["ok"] is True and acked["result"]["released"] == ["dev.sp"], acked
            await recorder.wait_for_async(
                lambda ms: [m for m in ms if m.json().get("type") == "override" and m.json()["state"] == "cleared"],
                topic=EVENTS)
            status = (await op.ask(envelope(keys, "carol", "status")))["result"]
            assert status["overrides"] == []
            resumed = await agent.gate.request("dev.sp", 11.0, source="optimizer")
            assert resumed.result == "applied", resumed
            assert plant.device("dev").written == [("dev.sp", 10.0), ("dev.sp", 11.0)]
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- config push


async def test_set_config_applied_refused_noop_and_rolled_back(tmp_path: Path, broker: Broker, pki: Pki,
                                                               keys: Keys) -> None:
    original = config_text(tmp_path, broker, pki, keys)
    path, backup = tmp_path / "agent.toml", tmp_path / "agent.toml.bak"
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, original)
        op = Operator(recorder)
        try:
            # invalid: refused with every problem, the file and the running config untouched
            bad = config_text(tmp_path, broker, pki, keys, interval="fast")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": bad}))
            assert answer["error"]["code"] == "invalid_config"
            assert any("interval" in p for p in answer["error"]["detail"]["problems"]), answer
            assert path.read_text() == original and not backup.exists()
            # unchanged: a no-op
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": original}))
            assert answer["ok"] and answer["result"]["changed"] is False
            # identity or data directory: needs a local restart, refused
            moved = config_text(tmp_path, broker, pki, keys, site="plant-b")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": moved}))
            assert answer["error"]["code"] == "needs_restart" and path.read_text() == original
            # locking every admin out: refused
            locked = config_text(tmp_path, broker, pki, keys, admin_role="viewer")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": locked}))
            assert answer["error"]["code"] == "invalid_config" and path.read_text() == original
            # good: applied by hot reload, previous kept as the backup
            slower = config_text(tmp_path, broker, pki, keys, interval="200ms")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": slower}))
            assert answer["ok"] is True and "device dev restarted" in answer["result"]["applied"], answer
            assert path.read_text() == slower and backup.read_text() == original
            assert agent.config.devices[0].interval == 0.2 and agent.runners["dev"].status.state == "up"
            # validates, but the device does not come up with it: rolled back to the backup
            unreachable = config_text(tmp_path, broker, pki, keys, interval="200ms", host=UNREACHABLE)
            began = time.monotonic()
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": unreachable}), timeout=30)
            assert answer["ok"] is False and answer["error"]["code"] == "rolled_back", answer
            assert "device dev is" in answer["error"]["message"] and "rolled back" in answer["error"]["message"]
            assert time.monotonic() - began >= 2.0  # it waited config_deadline for the device
            assert path.read_text() == slower and agent.config.devices[0].host == "127.0.0.1"  # type: ignore[attr-defined]
            await wait_for(lambda: agent.runners["dev"].status.state == "up", what="the device up again")
            twin = TwinView.open(agent.config.twin_path)
            await wait_for(lambda: [e for e in twin.events() if e["kind"] == "config" and e["state"] == "rolled_back"],
                           what="the rollback event")
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- model update


async def test_update_model_verified_and_old_kept_on_failure(tmp_path: Path, broker: Broker, pki: Pki,
                                                             keys: Keys) -> None:
    models = tmp_path / "models"
    models.mkdir()
    model_file = zscore_model(models / "health.onnx", [5.0], [1.0], inputs=["dev.pv"], threshold=9.0)
    original_bytes = model_file.read_bytes()
    health = builders.model("health", "anomaly", model_file, interval="200ms")
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys, models=[health]))
        op = Operator(recorder)
        runner = agent.models["health"]
        try:
            await wait_for(lambda: runner.status.state == "ready", what="the model loaded")
            first = runner.model
            new_bytes = zscore_model(tmp_path / "new.onnx", [6.0], [2.0], inputs=["dev.pv"], threshold=9.0).read_bytes()

            def update(blob: bytes, digest: str) -> dict[str, Any]:
                return envelope(keys, "alice", "update_model",
                                {"name": "health", "onnx": base64.b64encode(blob).decode(), "sha256": digest})

            wrong = await op.ask(update(new_bytes, hashlib.sha256(b"something else").hexdigest()))
            assert wrong["error"]["code"] == "hash_mismatch" and runner.model is first
            broken = b"\x08\x07this is not an onnx model"
            answer = await op.ask(update(broken, hashlib.sha256(broken).hexdigest()))
            assert answer["error"]["code"] == "invalid_model" and runner.model is first
            assert model_file.read_bytes() == original_bytes
            assert (await op.ask(envelope(keys, "bob", "update_model", {"name": "health", "onnx": "",
                                                                        "sha256": ""})))["error"]["code"] == "forbidden"
            good = await op.ask(update(new_bytes, hashlib.sha256(new_bytes).hexdigest()))
            assert good["ok"] is True and good["result"]["sha256"] == hashlib.sha256(new_bytes).hexdigest(), good
            assert runner.model is not first and runner.status.state == "ready"
            assert model_file.read_bytes() == new_bytes  # a restart keeps it
            assert (models / "health.onnx.bak").read_bytes() == original_bytes
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- foreign signers


def openssl_signed(openssl: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    """A key pair made by openssl and a command signed by ``openssl pkeyutl`` over the canonical bytes."""
    key, pub = directory / "dave.key", directory / "dave.pub"
    subprocess.run([openssl, "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, timeout=30)
    subprocess.run([openssl, "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True, timeout=30)
    now = int(time.time())
    body: dict[str, Any] = {"id": "openssl-1", "name": "read", "args": {"points": ["dev.pv"]}, "operator": "dave",
                            "issued_at": now, "expires_at": now + 60}
    canonical = directory / "canonical.json"
    canonical.write_bytes(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    signed = subprocess.run([openssl, "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-in", str(canonical)],
                            check=True, capture_output=True, timeout=30).stdout
    body["sig"] = base64.b64encode(signed).decode()
    return pub, body


async def test_command_signed_by_openssl_is_accepted(tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not installed; ./dev.sh test installs it (apt-get install openssl)")
    pub, body = openssl_signed(openssl, tmp_path)
    text = config_text(tmp_path, broker, pki, keys, operator=("dave", "viewer", pub))
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, text)
        try:
            answer = await Operator(recorder).ask(body)
            assert answer["ok"] is True and answer["id"] == "openssl-1", answer
            assert answer["result"][0]["name"] == "dev.pv"
            await audit_record(agent, recorder, "openssl-1", "ok")
        finally:
            await agent.stop()


def run_sync(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


async def test_operator_cli_end_to_end(tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    cli = [sys.executable, "-m", "edge_agent.cli"]
    made = run_sync([*cli, "keys", "new", "erin", "--dir", str(tmp_path / "erin")])
    assert made.returncode == 0, made.stderr
    private = tmp_path / "erin" / "erin.key"
    assert private.stat().st_mode & 0o777 == 0o600
    text = config_text(tmp_path, broker, pki, keys, operator=("erin", "admin", tmp_path / "erin" / "erin.pub"))
    base = [*cli, "command", "--broker", f"localhost:{broker.port}", "--ca", str(pki.ca_cert), "--cert",
            str(pki.operator_cert), "--key", str(pki.operator_key), "--operator", "erin", "--signing-key",
            str(private), "--gateway", "plant-a/gw-01", "--timeout", "20"]

    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(*base, *args, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    plant = fake_plant()
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, text, plant)
        try:
            await wait_for(lambda: agent.last_value("dev.sp"), what="a first reading")
            code, out, err = await run("write", "point=dev.sp", "value=7.5")
            assert code == 0, (out, err)
            assert json.loads(out)["result"]["readback"] == 7.5 and plant.device("dev").values["dev.sp"] == 7.5
            code, out, _ = await run("write", "point=dev.sp", "value=99")
            assert code == 1 and json.loads(out)["error"]["code"] == "rejected"
            new_text = config_text(tmp_path, broker, pki, keys, interval="150ms",
                                   operator=("erin", "admin", tmp_path / "erin" / "erin.pub"))
            (tmp_path / "new.toml").write_text(new_text)
            code, out, err = await run("set_config", "config=@" + str(tmp_path / "new.toml"))
            assert code == 0, (out, err)
            assert (tmp_path / "agent.toml").read_text() == new_text
            code, out, err = await run("nonsense")
            assert code == 1 and json.loads(out)["error"]["code"] == "unknown_command"
            code, _, err = await run("ping", "not-a-pair")
            assert code == 2 and "ARG=VALUE" in err
            assert any(m.json().get("operator") == "erin" for m in recorder.messages(EVENTS)
                       if m.json().get("type") == "command") or await recorder.wait_for_async(
                lambda ms: any(m.json().get("operator") == "erin" for m in ms), topic=EVENTS)
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- who answers where


async def test_response_topic_under_the_prefix_must_be_this_gateways_own(tmp_path: Path, broker: Broker, pki: Pki,
                                                                        keys: Keys) -> None:
    """Before: a signed ping with Response Topic edge/<site>/<another gateway>/telemetry was answered there,
    under this gateway's identity."""
    with Recorder(broker, "#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys))
        try:
            for foreign in ("edge/plant-a/gw-02/telemetry", f"{PREFIX}/telemetry", f"{PREFIX}/cmd/responses",
                            "edge/elsewhere", "edge/plant-a/gw-01/cmd/response/+"):
                command = envelope(keys, "bob", "write", {"point": "dev.sp", "value": 9})
                correlation = f"c-{foreign}".encode()
                recorder.publish(CMD, json.dumps(command).encode(),
                                 properties=publish_properties(response_topic=foreign, correlation_data=correlation))

                def refused(messages: list[Message], cid: str = command["id"]) -> Message | None:
                    return next((m for m in messages if m.json().get("id") == cid), None)

                answer = await recorder.wait_for_async(refused, topic=RESPONSE)
                body = answer.json()
                assert body["ok"] is False and body["error"]["code"] == "bad_response_topic", (foreign, body)
                assert answer.properties.CorrelationData == correlation
                assert not [m for m in recorder.messages() if m.topic == foreign and b'"ok"' in m.payload], foreign
                await audit_record(agent, recorder, command["id"], "bad_response_topic")
            assert plant_value(agent) != 9  # none of those writes ran
            # outside the prefix, an operator tool's own reply topic is fine; and our own subtree is
            ok = await Operator(recorder).ask(envelope(keys, "carol", "ping"))
            assert ok["ok"] is True
            command = envelope(keys, "carol", "ping")
            recorder.publish(CMD, json.dumps(command).encode(),
                             properties=publish_properties(response_topic="ops/replies/7", correlation_data=b"x"))
            answer = await recorder.wait_for_async(lambda ms: next((m for m in ms if m.topic == "ops/replies/7"),
                                                                   None))
            assert answer.json()["ok"] is True and answer.json()["id"] == command["id"]
        finally:
            await agent.stop()


def plant_value(agent: Any) -> Any:
    reading = agent.last_value("dev.sp")
    return reading.value if reading else None


async def test_replay_ids_belong_to_their_operator(tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    """Before: ids were global, so a viewer who saw an admin's command id first could burn it."""
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys))
        op = Operator(recorder)
        try:
            squatted = await op.ask(envelope(keys, "carol", "ping", command_id="change-42"))
            assert squatted["ok"] is True
            admin = await op.ask(envelope(keys, "alice", "get_config", command_id="change-42"))
            assert admin["ok"] is True and admin["id"] == "change-42", admin
            again = await op.ask(envelope(keys, "alice", "get_config", command_id="change-42"))
            assert again["error"]["code"] == "replayed"
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- persisting what was pushed


async def test_set_config_keeps_the_file_mode_and_answers_failed_when_it_cannot_write(
        tmp_path: Path, broker: Broker, pki: Pki, keys: Keys) -> None:
    """Before: the backup took the default file mode (a config with passwords became world-readable), and a
    file that could not be written was answered "internal"."""
    original = config_text(tmp_path, broker, pki, keys)
    path, backup = tmp_path / "agent.toml", tmp_path / "agent.toml.bak"
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, original)
        path.chmod(0o600)
        op = Operator(recorder)
        try:
            slower = config_text(tmp_path, broker, pki, keys, interval="200ms")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": slower}))
            assert answer["ok"] is True, answer
            assert backup.read_text() == original and path.read_text() == slower
            assert (backup.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o600, 0o600)
            # the folder cannot take the new file (here: its temp name is taken by a folder; under the
            # hardened unit without ReadWritePaths, a read-only file system)
            (tmp_path / ".agent.toml.tmp").mkdir()
            faster = config_text(tmp_path, broker, pki, keys, interval="150ms")
            answer = await op.ask(envelope(keys, "alice", "set_config", {"config": faster}))
            assert answer["error"]["code"] == "failed", answer
            assert "cannot write" in answer["error"]["message"] and "systemd/README.md" in answer["error"]["message"]
            assert path.read_text() == slower and agent.config.devices[0].interval == 0.2  # nothing applied
        finally:
            await agent.stop()


async def test_update_model_that_cannot_be_saved_is_not_swapped_in(tmp_path: Path, broker: Broker, pki: Pki,
                                                                   keys: Keys) -> None:
    """Before: the model was swapped in memory, the answer was "failed", and a restart silently brought the
    old one back."""
    models = tmp_path / "models"
    models.mkdir()
    model_file = zscore_model(models / "health.onnx", [5.0], [1.0], inputs=["dev.pv"], threshold=9.0)
    health = builders.model("health", "anomaly", model_file, interval="200ms")
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(tmp_path, config_text(tmp_path, broker, pki, keys, models=[health]))
        runner = agent.models["health"]
        try:
            await wait_for(lambda: runner.status.state == "ready", what="the model loaded")
            first = runner.model
            models.rename(tmp_path / "models.moved")
            models.write_text("not a folder any more")  # the model's folder cannot be written
            new = zscore_model(tmp_path / "new.onnx", [6.0], [2.0], inputs=["dev.pv"], threshold=9.0).read_bytes()
            answer = await Operator(recorder).ask(envelope(keys, "alice", "update_model", {
                "name": "health", "onnx": base64.b64encode(new).decode(), "sha256": hashlib.sha256(new).hexdigest()}))
            assert answer["error"]["code"] == "failed", answer
            assert "running model is kept" in answer["error"]["message"]
            assert runner.model is first  # what runs is what a restart would load
        finally:
            await agent.stop()

"""The optimiser on the simulated plant's real servers: advise never writes; auto writes are rolled back.

The simulation model is a tiny linear ONNX model (tests/onnx_models.linear_model) whose predicted
power falls as the chiller setpoint rises, so raising the setpoint by one max_step is always
attractive. The run uses the real Agent with recording drivers (tests/fakes.WriteLog).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge_agent.demo.plant import Plant
from edge_agent.store.views import TwinView
from tests import builders
from tests.builders import plant_config
from tests.fakes import WriteLog
from tests.gate_support import gate_watching, hmi_write_setpoint
from tests.helpers import SPEED, free_port, opcua_setpoint, reader, running, wait_for
from tests.onnx_models import linear_model, zscore_model

# power = 100 - 10 * setpoint (+ 0 * load); supply = setpoint
SIM = builders.model("sim", "simulation", "sim.onnx")
# the plant "reacts badly": supply temperature more than 0.2 degC away from 7
WATCHDOG = builders.model("supply-watch", "anomaly", "watch.onnx", interval="0.2s", threshold=4.0, raise_after=1,
                   clear_after=1)


def optimizer_section(mode: str) -> builders.Doc:
    """The [optimizer] section: raise the chiller setpoint to cut the simulated power, supply at most 12."""
    return builders.optimizer("sim", ["chiller1.setpoint"], {"power": 1.0},
                              constraints=[{"output": "supply", "max": 12.0}], mode=mode, interval="0.3s", candidates=5)


def _models(tmp_path: Path) -> None:
    linear_model(tmp_path / "sim.onnx", [[-10.0, 1.0], [0.0, 0.0]], [100.0, 0.0],
                 inputs=["chiller1.setpoint", "chiller1.load"], outputs=["power", "supply"])
    zscore_model(tmp_path / "watch.onnx", mean=[7.0], scale=[0.1], inputs=["chiller1.supply_temp"])


def _events(twin: TwinView, kind: str) -> list[dict[str, Any]]:
    return [e for e in twin.events() if e["kind"] == kind]


async def test_advise_mode_records_recommendations_and_never_writes(tmp_path: Path) -> None:
    _models(tmp_path)
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=21, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, models=[SIM], optimizer=optimizer_section("advise"))
        async with running(cfg, writes, ready=("chiller1.setpoint", "chiller1.load")) as agent:
            twin = reader(cfg)
            assert agent.optimizer is not None and agent.optimizer.mode == "advise"

            def advised() -> list[dict[str, Any]]:
                rows = [e for e in twin.events() if e["kind"] == "recommendation"]
                return rows if len(rows) >= 3 else []

            recommendations = await wait_for(advised, timeout=20, what="three recommendations stored")
            for rec in recommendations:
                assert (rec["source"], rec["state"]) == ("optimizer", "advise"), rec
                assert rec["detail"]["setpoints"] == {"chiller1.setpoint": 7.5}  # one max_step up
                assert rec["detail"]["objective"] < rec["detail"]["hold_objective"]
                assert "chiller1.setpoint 7 -> 7.5" in rec["message"]
            assert agent.optimizer.last is not None and agent.optimizer.last.results == []
            assert [w for w in twin.writes() if w["source"] == "optimizer"] == []
            assert twin.writes() == [] and twin.desired() == []
            assert await opcua_setpoint(plant.opcua_endpoint) == 7.0
            assert agent.optimizer.mode == "advise"
            twin.close()
        assert plant.model.chiller_setpoint == 7.0
    assert writes.calls == []


async def test_post_write_anomaly_rolls_back_and_drops_to_advise(tmp_path: Path) -> None:
    _models(tmp_path)
    writes = WriteLog()
    gate = {"watch": "60s", "readback_timeout": "3s"}
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=22, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, gate=gate, models=[SIM, WATCHDOG], optimizer=optimizer_section("auto"),
                           chiller_interval="30s")
        async with running(cfg, writes, ready=("chiller1.setpoint", "chiller1.supply_temp")) as agent:
            twin = reader(cfg)
            optimizer = agent.optimizer
            assert optimizer is not None and optimizer.mode == "auto"
            assert not agent.anomaly_active("chiller1")
            await wait_for(lambda: plant.model.chiller_setpoint == 7.5, timeout=20,
                           what="the optimiser's automatic write on the plant")
            await wait_for(lambda: optimizer.mode == "advise", timeout=30, what="rollback and advise mode")
            await wait_for(lambda: plant.model.chiller_setpoint == 7.0, timeout=10, what="the plant back on 7")
            assert await opcua_setpoint(plant.opcua_endpoint) == 7.0
            await wait_for(lambda: _events(twin, "rollback"), timeout=10, what="the rollback event")

            rows = twin.writes()
            auto = [w for w in rows if w["source"] == "optimizer" and w["result"] == "applied"]
            assert [(w["point"], w["old"], w["written"], w["readback"]) for w in auto] == [
                ("chiller1.setpoint", 7.0, 7.5, 7.5)]
            back = [w for w in rows if w["result"] == "rolled_back"]
            assert [(w["source"], w["point"], w["old"], w["written"], w["readback"]) for w in back] == [
                ("rollback", "chiller1.setpoint", 7.5, 7.0, 7.0)]
            assert back[0]["ts"] > auto[0]["ts"]
            assert back[0]["ts"] - auto[0]["ts"] < cfg.gate.watch

            rollback = _events(twin, "rollback")
            assert len(rollback) == 1 and rollback[0]["source"] == "gate"
            assert "chiller1.setpoint restored to 7 (rolled_back)" in rollback[0]["message"]
            assert "anomaly raised on chiller1 (supply-watch)" in rollback[0]["message"]
            modes = _events(twin, "mode")
            assert [m["state"] for m in modes] == ["advise"] and "rollback" in modes[0]["message"]
            assert any(e["state"] == "raised" and e["source"] == "supply-watch" for e in _events(twin, "anomaly"))

            # advise from now on: recommendations go on, writes do not
            steps = optimizer.steps
            await wait_for(lambda: optimizer.steps >= steps + 3, timeout=10, what="three more optimiser steps")
            assert optimizer.mode == "advise"
            started = time.time()
            later = [w for w in (twin.writes()) if w["ts"] > back[0]["ts"]]
            assert later == [] and started > back[0]["ts"]
            twin.close()
        assert plant.model.chiller_setpoint == 7.0
    assert [(p, v) for p, v, _ in writes.calls] == [("chiller1.setpoint", 7.5), ("chiller1.setpoint", 7.0)]
    writes.assert_all_through_gate()


async def test_unconfirmed_automatic_write_is_undone_and_drops_to_advise(tmp_path: Path) -> None:
    """The chiller's controller ignores setpoint writes: the optimiser's write is not confirmed, so the
    gate writes the previous setpoint back, confirms it, and the optimiser stops writing."""
    _models(tmp_path)
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=23, speed=SPEED,
                     steady_load=True) as plant:
        plant.inject_fault("stuck_setpoint")
        cfg = plant_config(tmp_path, plant, gate={"readback_timeout": "1.5s"}, models=[SIM],
                           optimizer=optimizer_section("auto"), chiller_interval="30s")
        async with running(cfg, writes, ready=("chiller1.setpoint", "chiller1.load")) as agent:
            twin = reader(cfg)
            optimizer = agent.optimizer
            assert optimizer is not None
            await wait_for(lambda: optimizer.mode == "advise", timeout=30, what="advise mode after the undone write")
            rows = await wait_for(lambda: twin.writes() if len(twin.writes()) >= 2 else [], timeout=10,
                                  what="the write and its undoing")
            assert [(w["source"], w["result"], w["written"], w["readback"]) for w in rows] == [
                ("optimizer", "failed", 7.5, 7.0), ("rollback", "rolled_back", 7.0, 7.0)]
            assert rows[0]["reason"].endswith("; restored to 7")
            [event] = _events(twin, "rollback")
            assert event["message"] == ("chiller1.setpoint: the write of 7.5 (optimizer) was not confirmed; "
                                        "restored to 7")
            assert "rollback: chiller1.setpoint" in _events(twin, "mode")[0]["message"]
            assert await opcua_setpoint(plant.opcua_endpoint) == 7.0
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("chiller1.setpoint", 7.5), ("chiller1.setpoint", 7.0)]


async def test_an_operator_override_pauses_the_optimiser_until_acknowledged(tmp_path: Path) -> None:
    """An operator sets the chiller at its own HMI: the optimiser, in auto, leaves that setpoint alone
    (it recommends, and waits) until the override event is acknowledged."""
    _models(tmp_path)
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=24, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, gate={"readback_timeout": "1.5s"}, models=[SIM],
                           optimizer=optimizer_section("advise"), chiller_interval="30s")
        async with running(cfg, writes, ready=("chiller1.setpoint", "chiller1.load")) as agent:
            twin = reader(cfg)
            optimizer = agent.optimizer
            assert optimizer is not None
            await gate_watching(agent, "chiller1.setpoint")
            await hmi_write_setpoint(plant.opcua_endpoint, 8.0)
            [override] = await wait_for(lambda: _events(twin, "override"), timeout=10, what="the override event")
            optimizer.set_mode("auto", reason="test")
            steps = optimizer.steps
            await wait_for(lambda: optimizer.steps >= steps + 3, timeout=10, what="three steps in auto")
            assert optimizer.last is not None and optimizer.last.action == "wait"
            assert optimizer.last.setpoints == {"chiller1.setpoint": 8.5} and twin.writes() == []
            assert agent.event_acked(override["id"], "ann") == ["chiller1.setpoint"]
            await wait_for(lambda: plant.model.chiller_setpoint == 8.5, timeout=10, what="the optimiser's write")
            [row] = await wait_for(twin.writes, timeout=5, what="the write's audit row")
            assert (row["source"], row["result"], row["old"], row["written"]) == ("optimizer", "applied", 8.0, 8.5)
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("chiller1.setpoint", 8.5)]

"""The demo plant's physics, without any I/O: a chiller and the pump of its chilled-water loop.

Plain float arithmetic on numpy random streams, stepped in fixed increments of simulated time, so
a run is deterministic given its seed and the setpoints it receives. :mod:`edge_agent.demo.plant`
serves this model over real OPC UA and Modbus servers; ``models/build.py`` runs it headless to
train the shipped models.

- The chiller's supply temperature follows its setpoint with a first-order lag and rises when
  the chiller is overloaded; its electric power falls about 2.5 % per degC as the supply
  temperature rises; the return temperature follows from the load and the pump's flow.
- The building's thermal load swings slowly, plus noise, from its own random stream, so two
  models with the same seed see the same load whatever their setpoints.
- Faults (:data:`FAULTS`): ``vibration`` (a failing bearing: vibration ramps up over about a
  minute of simulated time), ``sensor_drift`` (the supply temperature sensor drifts away from
  the truth), ``stuck_setpoint`` (the chiller controller ignores setpoint writes and reverts them).
"""

from __future__ import annotations

import math

import numpy as np

FAULTS = ("vibration", "sensor_drift", "stuck_setpoint")

# Chiller design figures.
CHILLER_SETPOINT_RANGE = (4.0, 15.0)
CHILLER_SETPOINT_DEFAULT = 7.0
CHILLER_CAPACITY_KW = 420.0      # thermal capacity at 7 degC supply
CHILLER_COP = 5.2                # at 7 degC supply and 80 % part load
CHILLER_AUX_KW = 6.0             # controls, oil heater, panel
SUPPLY_TAU_S = 60.0              # supply temperature lag
WATER_KWH_PER_M3K = 1.163        # rho * cp of water
BYPASS_FLOW_M3H = 20.0           # the evaporator bypass keeps at least this flow
# Pump design figures (affinity laws around the rated point).
PUMP_RATED_RPM = 1450.0
PUMP_SPEED_RANGE = (0, 1800)
PUMP_RATED_FLOW_M3H = 72.0
PUMP_RATED_KW = 5.5
PUMP_RAMP_RPM_S = 60.0           # VFD acceleration
SUCTION_BAR = 1.2
MOTOR_TAU_S = 600.0
MOTOR_ALARM_DEGC = 80.0
AMBIENT_DEGC = 25.0


def _lag(value: float, target: float, dt: float, tau: float) -> float:
    """One step of a first-order lag towards ``target``."""
    return target + (value - target) * math.exp(-dt / tau)


def clamp(value: float, low: float, high: float) -> float:
    """``value`` limited to ``low..high``."""
    return min(max(value, low), high)


# --------------------------------------------------------------------------- physics


class PlantModel:
    """The plant's physics without any I/O: set the setpoints, call ``step(dt)``, read the state.

    The load comes from its own random stream, so two models with the same seed see the same
    load whatever their setpoints; measurement noise comes from a second stream.
    """

    def __init__(self, seed: int = 1, *, steady_load: bool = False) -> None:
        load_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
        self._load_rng = np.random.default_rng(load_seq)
        self._noise_rng = np.random.default_rng(noise_seq)
        self.steady_load = steady_load
        self.elapsed = 0.0
        self.chiller_setpoint = CHILLER_SETPOINT_DEFAULT
        self.pump_speed_setpoint = int(PUMP_RATED_RPM)
        self.pump_run = True
        self.fault: str | None = None
        self.fault_age = 0.0
        self._load_noise = 0.0
        self.load = self._base_load()
        self.supply_temp = CHILLER_SETPOINT_DEFAULT
        self.pump_speed = PUMP_RATED_RPM
        self.motor_temp = self._motor_target()
        self.chiller_energy = 0.0
        self.pump_energy = 0.0
        self.flow_total = 0.0
        self.readings: dict[str, float] = {}
        self._measure()

    # -- derived quantities
    @property
    def pump_flow(self) -> float:
        return PUMP_RATED_FLOW_M3H * self.pump_speed / PUMP_RATED_RPM

    @property
    def pump_pressure(self) -> float:
        return SUCTION_BAR + 2.8 * (self.pump_speed / PUMP_RATED_RPM) ** 2

    @property
    def pump_power(self) -> float:
        return PUMP_RATED_KW * (self.pump_speed / PUMP_RATED_RPM) ** 3

    @property
    def capacity(self) -> float:
        """Thermal capacity: warmer leaving water lifts the evaporating pressure and capacity."""
        return CHILLER_CAPACITY_KW * (1.0 + 0.03 * (self.supply_temp - 7.0))

    @property
    def return_temp(self) -> float:
        return self.supply_temp + self.load / (WATER_KWH_PER_M3K * max(self.pump_flow, BYPASS_FLOW_M3H))

    @property
    def chiller_power(self) -> float:
        """Electric power: heat removed / COP; COP rises ~2.8 %/degC of supply temperature."""
        served = min(self.load, self.capacity)
        part_load = served / self.capacity
        cop = CHILLER_COP * (1.0 + 0.028 * (self.supply_temp - 7.0)) * (1.0 - 0.3 * (part_load - 0.8) ** 2)
        return served / cop + CHILLER_AUX_KW

    @property
    def vibration(self) -> float:
        base = 1.8 + 0.6 * min(self.load / self.capacity, 1.2)
        if self.fault == "vibration":
            base += 6.5 * min(self.fault_age / 60.0, 1.0) ** 2
        return base

    @property
    def supply_sensor_error(self) -> float:
        return min(0.025 * self.fault_age, 5.0) if self.fault == "sensor_drift" else 0.0

    # -- stepping
    def step(self, dt: float) -> None:
        """Advance the plant by ``dt`` simulated seconds."""
        self.elapsed += dt
        if self.fault is not None:
            self.fault_age += dt
        self._step_load(dt)
        self._step_pump(dt)
        self._step_chiller(dt)
        self._measure()

    def _base_load(self) -> float:
        if self.steady_load:
            return 320.0 + self._load_noise
        t = self.elapsed
        swing = 90.0 * math.sin(2 * math.pi * t / 1200.0) + 35.0 * math.sin(2 * math.pi * t / 300.0 + 0.7)
        return 320.0 + swing + self._load_noise

    def _step_load(self, dt: float) -> None:
        decay = math.exp(-dt / 30.0)  # AR(1) noise: occupancy, solar gain, doors
        shock = float(self._load_rng.standard_normal())
        self._load_noise = self._load_noise * decay + 8.0 * math.sqrt(1.0 - decay * decay) * shock
        self.load = max(self._base_load(), 0.0)

    def _step_pump(self, dt: float) -> None:
        target = float(clamp(self.pump_speed_setpoint, *PUMP_SPEED_RANGE)) if self.pump_run else 0.0
        change = clamp(target - self.pump_speed, -PUMP_RAMP_RPM_S * dt, PUMP_RAMP_RPM_S * dt)
        self.pump_speed += change
        self.motor_temp = _lag(self.motor_temp, self._motor_target(), dt, MOTOR_TAU_S)
        self.flow_total += self.pump_flow * dt / 3600.0
        self.pump_energy += self.pump_power * dt / 3600.0

    def _motor_target(self) -> float:
        return AMBIENT_DEGC + 30.0 * self.pump_power / PUMP_RATED_KW

    def _step_chiller(self, dt: float) -> None:
        setpoint = clamp(self.chiller_setpoint, *CHILLER_SETPOINT_RANGE)
        deficit = max(self.load - self.capacity, 0.0)
        self.supply_temp = _lag(self.supply_temp, setpoint + 0.04 * deficit, dt, SUPPLY_TAU_S)
        self.chiller_energy += self.chiller_power * dt / 3600.0

    def _measure(self) -> None:
        """What the instruments report: the truth plus noise (and a fault's effect)."""
        noise = self._noise_rng.standard_normal(9)
        running = self.pump_speed > 1.0  # the VFD still turns while it ramps down after a stop
        fault_scatter = 0.3 * min(self.fault_age / 60.0, 1.0) if self.fault == "vibration" else 0.0
        self.readings = {
            "chiller1.supply_temp": self.supply_temp + self.supply_sensor_error + 0.03 * noise[0],
            "chiller1.return_temp": self.return_temp + 0.03 * noise[1],
            "chiller1.power": self.chiller_power + 0.4 * noise[2],
            "chiller1.vibration": max(self.vibration + (0.08 + fault_scatter) * noise[3], 0.0),
            "chiller1.load": self.load + 3.0 * noise[4],
            "chiller1.setpoint": self.chiller_setpoint,
            "chiller1.energy": self.chiller_energy,
            "pump1.flow": max(self.pump_flow + 0.4 * noise[5], 0.0) if running else 0.0,
            "pump1.pressure": self.pump_pressure + 0.015 * noise[6],
            "pump1.speed": float(round(max(self.pump_speed + 1.5 * noise[7], 0.0))) if running else 0.0,
            "pump1.power": self.pump_power * (1.0 + 0.01 * noise[8]),
            "pump1.motor_temp": round(self.motor_temp, 1),
            "pump1.running": float(self.pump_run),
            "pump1.overtemp": float(self.motor_temp > MOTOR_ALARM_DEGC),
            "pump1.flow_total": self.flow_total,
            "pump1.speed_setpoint": float(self.pump_speed_setpoint),
        }

    def truth(self) -> dict[str, float]:
        """The true values behind the readings (no noise, no sensor fault)."""
        return {
            "chiller1.supply_temp": self.supply_temp, "chiller1.return_temp": self.return_temp,
            "chiller1.power": self.chiller_power, "chiller1.vibration": self.vibration,
            "chiller1.load": self.load, "chiller1.setpoint": self.chiller_setpoint,
            "chiller1.energy": self.chiller_energy, "pump1.flow": self.pump_flow,
            "pump1.pressure": self.pump_pressure, "pump1.speed": self.pump_speed,
            "pump1.power": self.pump_power, "pump1.motor_temp": self.motor_temp,
            "pump1.running": float(self.pump_run), "pump1.flow_total": self.flow_total,
            "pump1.speed_setpoint": float(self.pump_speed_setpoint), "pump1.energy": self.pump_energy,
        }

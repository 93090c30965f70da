"""Simulated home devices: a fleet of thermometers and infusion pumps publishing over MQTT.

``fleet`` is the pure part (what each device says and when, given the time) and ``registry``
the rows that register the fleet's devices; ``publisher`` is the I/O part (the MQTT connection
and the wall clock); ``settings`` holds ``SimulatorSettings``.
"""

from vigil_tools.simulator.fleet import (
    Fleet,
    Outgoing,
    Scenario,
    ScenarioSpecError,
    ScenarioTiming,
    parse_scenario_spec,
)
from vigil_tools.simulator.registry import FleetRegistry, fleet_registry
from vigil_tools.simulator.settings import SimulatorSettings

__all__ = [
    "Fleet",
    "FleetRegistry",
    "Outgoing",
    "Scenario",
    "ScenarioSpecError",
    "ScenarioTiming",
    "SimulatorSettings",
    "fleet_registry",
    "parse_scenario_spec",
]

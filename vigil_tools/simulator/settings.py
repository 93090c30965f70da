"""Simulator settings (env prefix ``VIGIL_SIM_``), built at start-up, never at import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vigil.settings import MqttSettings
from vigil_tools.simulator.fleet import ScenarioTiming, parse_scenario_spec


class SimulatorSettings(BaseSettings):
    """A fleet of virtual home devices publishing to the broker as the ``vigil-sim`` gateway."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_SIM_", extra="ignore")

    # A home-hub gateway account: the broker's ACL lets it write under every device's topics.
    mqtt_username: str = "vigil-sim"
    mqtt_password: str = ""
    # None: a fresh id per process, so two simulators never take over each other's session.
    mqtt_client_id: str | None = None
    patients: int = Field(default=10, ge=1, le=1_000_000)
    # Patients are P-0001 upwards; a second fleet on the same broker (a test beside a demo)
    # numbers from elsewhere so neither sees the other's devices. The registry must match.
    first_patient: int = Field(default=1, ge=1)
    # Seconds between one device's readings (thermometer) or status reports (pump). The floor
    # keeps the seq numbering below the clock's milliseconds (see ``Fleet``).
    interval_s: float = Field(default=5.0, ge=0.05)
    # The default makes the first patient febrile and the second occluded, so a run of the
    # local stack pages within a minute.
    scenario: str = "fever:1,occlusion:1,normal:rest"
    seed: int = 1
    duration_s: float | None = Field(default=None, gt=0)
    # The device contract requires QoS 1; 2 works too but costs a round trip more.
    qos: Literal[1, 2] = 1
    # Unacknowledged publishes allowed at once. The broker's own inflight limit and the
    # 65,535 message ids of MQTT are far above this; the point is memory and fairness.
    max_inflight: int = Field(default=200, ge=1, le=10_000)
    publish_timeout_s: float = Field(default=30.0, gt=0)
    # The device contract's end-to-end acknowledgement (docs/mqtt.md 4.1): keep every message
    # until ingest answers it on vigil/v1/ack/{device_id}; send it again after resend_after_s.
    end_to_end_acks: bool = True
    resend_after_s: float = Field(default=60.0, gt=0)
    fever_onset_s: float = Field(default=20.0, ge=0)
    occlusion_after_s: float = Field(default=30.0, ge=0)
    occlusion_clear_after_s: float | None = Field(default=None, gt=0)
    log_level: str = "INFO"

    mqtt: MqttSettings = Field(default_factory=MqttSettings)

    @model_validator(mode="after")
    def _scenario_fits_fleet(self) -> SimulatorSettings:
        # Refuse a bad spec or timing when settings are built, not minutes into a run.
        parse_scenario_spec(self.scenario, self.patients)
        self.timing()
        return self

    def timing(self) -> ScenarioTiming:
        return ScenarioTiming(
            fever_onset_s=self.fever_onset_s,
            occlusion_after_s=self.occlusion_after_s,
            occlusion_clear_after_s=self.occlusion_clear_after_s,
        )

"""Rules service: turns validated telemetry into alerts on device time."""

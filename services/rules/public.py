"""What other services may use of the rules service (``tests/unit/test_layers.py``): the
threshold model a care team's protocol or a patient's override is written in, and the order in
which those layers are merged, so the dashboard shows the limits the rules judge by."""

from __future__ import annotations

from services.rules.domain.config import Thresholds, layered_thresholds

__all__ = ["Thresholds", "layered_thresholds"]

"""The names of audited actions, so writers and `vigil audit list --kind` agree on spelling."""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    ALERT_ACKNOWLEDGED = "alert.acknowledged"
    THRESHOLDS_CHANGED = "thresholds.changed"
    RULES_CONFIG_SAVED = "rules_config.saved"
    RULES_CONFIG_LOADED = "rules_config.loaded"
    QUIET_HOURS_CHANGED = "notify.quiet_hours_changed"
    EARLY_CYCLE_ESCALATION_CHANGED = "notify.early_cycle_escalation_changed"
    REPLAY_RUN = "replay.run"
    PIPELINE_OUTAGE_RECORDED = "notify.pipeline_outage_recorded"
    ALERT_NOT_PAGED = "notify.alert_not_paged"
    COVER_SUMMARY_SENT = "notify.cover_summary_sent"

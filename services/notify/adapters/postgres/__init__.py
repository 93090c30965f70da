"""The notify service's PostgreSQL adapters: the alert log (``alerts``), and one repository
per aggregate of the paging path (``escalations``, ``outbox``, ``bundles``, ``policies``,
``heartbeats``) sharing one connection and transaction through ``unit_of_work``.
"""

from services.notify.adapters.postgres.alerts import PostgresNotifyRepository, alert_from_row

__all__ = ["PostgresNotifyRepository", "alert_from_row"]

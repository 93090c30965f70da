"""Notify: turns alert phases from the rules service into pages that reach a clinician.

The service consumes ``vigil.alerts.v1``, records every alert phase, decides whom to page
(``domain``), keeps one page per idempotency key in PostgreSQL and sends it over SMTP
(``adapters``), retrying until the mail server accepts it. ``app`` is the composition root.
It never decides whether a patient is ill (that is the rules service) and never reads telemetry.
"""

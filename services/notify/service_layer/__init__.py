"""Use cases of the notify service, written against ports so unit tests can pass fakes.

Owns the order of the steps (record, decide, queue, send, record the attempt, retry); owns no
I/O itself. Decisions come from ``services.notify.domain``; I/O comes from ``adapters``.
"""

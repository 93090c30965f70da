"""Replay: re-run a recorded stream through pinned rules, compare decisions, report them.

Owns reading the recorded stream (telemetry topic or readings archive) without side effects,
driving the rules engine through ``engine_port`` (the only module that knows how the engine is
built), diffing alert sets, rules config versions in PostgreSQL, and the JSON/CSV/HTML reports.
It must not write to live topics or tables, and never pages anyone; its one write is its own
``replay.run`` entry in the audit log.
"""

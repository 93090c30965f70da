"""The clinical rules, pure: no asyncio, no Kafka, no database, no wall clock.

Time comes only from the events' device timestamps, so a replay of a recorded stream makes the
same decisions, and tests move time by writing it into the events.
"""

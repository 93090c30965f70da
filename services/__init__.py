"""Vigil's three services: ingest, rules and notify."""

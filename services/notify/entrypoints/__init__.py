"""Notify's entry points: the HTTP routers of its API (``entrypoints/http``)."""

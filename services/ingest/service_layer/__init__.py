"""Ingest's use cases against ports: admit a batch, make it durable, acknowledge, answer."""

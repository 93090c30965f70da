"""Ingest's consumer loop: the broker connection around the service layer."""

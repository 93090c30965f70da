"""I/O adapters of ingest: PostgreSQL (registry and readings) and Kafka."""

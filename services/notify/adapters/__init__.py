"""I/O of the notify service: PostgreSQL (pages and their delivery log), SMTP, Kafka.

Adapters implement the ports of ``service_layer.ports`` and decide nothing about paging.
"""

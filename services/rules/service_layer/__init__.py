"""The rules service's use cases, against ports (``ports.py``): a batch of telemetry records
through the engines into one Kafka transaction (``batch.py``), and a new configuration swapped
into the engines between two batches (``config_swap.py``). No Kafka client and no database
here: the adapters implement the ports, and unit tests pass in-memory fakes."""

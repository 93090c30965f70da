"""Pure ingest logic: validation and device-to-patient binding. No I/O, no wall clock."""

"""I/O adapters of the rules service."""

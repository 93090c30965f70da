"""Benchmarks: each prints one JSON line of figures at the end; never timed assertions."""

"""Test helpers shared by the tests, the golden recorder and the benchmarks (no service imports
them)."""

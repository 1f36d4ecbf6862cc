"""Benchmarks run with `dsv4 bench ...`."""

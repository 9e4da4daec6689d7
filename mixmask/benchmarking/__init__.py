"""Benchmark suites behind `bench.py`: a shared timing protocol and one module per mode."""

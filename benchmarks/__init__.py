"""Benchmarks of dvd-serve: load generation, system comparisons, transfer micro-benchmarks."""

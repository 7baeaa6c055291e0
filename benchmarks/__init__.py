"""Benchmarks and load generators for FIT Broker."""

"""Benchmarks: `make bench` (full) and `make bench-quick` (a one-minute smoke run)."""

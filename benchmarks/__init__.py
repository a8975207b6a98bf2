"""Measured comparisons; each module writes its section of docs/benchmarks.md."""

"""Benchmark programs: each `python -m bench.<name> ...` prints one JSON object (results in docs/benchmarks.md)."""

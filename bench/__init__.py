"""Benchmarks: each module runs its own Redis, simulator and workers (python -m bench.<name>)."""

"""Benchmarks: scripts that time the code users run (``python -m bench.NAME``)."""

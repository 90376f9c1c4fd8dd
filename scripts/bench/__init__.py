"""Benchmarks and the child processes they time (see scripts/__init__.py)."""

"""Modules the tools import and never run (see scripts/__init__.py)."""

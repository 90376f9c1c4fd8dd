"""Checks: the module graph (scripts/test.sh), load and abuse checks of a live server."""

"""Maintenance tools, each run with ``python -m moebench.tools.<name>`` (not part of the harness)."""

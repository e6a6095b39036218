"""moebench: benchmark and validation suite for expert-parallel Mixture-of-Experts."""

__version__ = "0.1.0"

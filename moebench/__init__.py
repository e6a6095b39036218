"""moebench: benchmark and validation suite for expert-parallel Mixture-of-Experts."""

from pathlib import Path

__version__ = "0.1.0"
REPO = Path(__file__).resolve().parent.parent  # the checkout moebench runs from (results/, scenarios/)

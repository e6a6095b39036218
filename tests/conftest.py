"""Shared pytest setup: tests marked ``gpu`` are skipped cleanly when no CUDA device is visible; the
calibration cache lives in the session's temporary folder."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Calibrated router offsets go to a folder of this session (shared by its spawned ranks), not ~/.cache."""
    os.environ["MOEBENCH_CACHE"] = str(tmp_path_factory.mktemp("moebench-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

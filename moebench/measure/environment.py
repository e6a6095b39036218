"""Where the numbers came from: the code version, software and hardware a result file records.

Imports torch (versions, visible GPUs); the report layer never imports this module.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from moebench import REPO
from moebench.measure.slowdown import SLOWDOWN_ENV


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> tuple[list[str], str | None]:
    """Names of the visible CUDA devices and the driver version (NVML), if any."""
    if not torch.cuda.is_available():
        return [], None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        driver = None
    return names, driver


def environment() -> dict:
    """Where the numbers came from: code version, software, hardware."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    gpus, driver = _gpus()
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "gpus": gpus,
        "gpu_driver": driver,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "test_knobs": {SLOWDOWN_ENV: os.environ[SLOWDOWN_ENV]} if SLOWDOWN_ENV in os.environ else {},
    }


def short_sha() -> str:
    return _git("rev-parse", "--short", "HEAD") or "nogit"

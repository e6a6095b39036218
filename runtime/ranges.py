"""Named ranges on the profiler's timeline, so a trace shows where a layer's time goes.

The layer marks ``route``, then per chunk i ``dispatch[i]`` (launching its all-to-all),
``dispatch[i].wait`` (waiting for its rows: exposed communication), ``experts[i]`` and
``combine[i]`` (launching its way back), and last ``combine.wait`` (one chunk, i = 0, on the
serial path). ``torch.profiler.record_function`` puts each range in a
torch.profiler (Chrome/Perfetto) trace; on CUDA the same name is also pushed as an NVTX range, so
Nsight Systems shows it too. Outside a profiler a range costs about a microsecond.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def span(name: str, device: torch.device):
    """Mark ``name`` on the profiler's timeline (and NVTX on CUDA) while the block runs."""
    nvtx = device.type == "cuda"
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()

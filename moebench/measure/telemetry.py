"""Per-rank telemetry around a timed window: a background sampler of the GPU (NVML) and host memory.

Scope: ``Sampler``, a context manager each rank runs around its timed section; the pure functions
it is built from (PCI bus-id matching, throttle-reason decoding, window energy, the per-rank
summary); and ``combine_summaries``, the run-level view over all ranks' summaries. Nothing here
reads the rank or calls torch.distributed: the caller gathers the per-rank summaries.

Energy method (docs/results.md, "Energy, power and memory"): synchronize the device, then read
``nvmlDeviceGetTotalEnergyConsumption`` (mJ) at both edges of the window; energy = Δ / 1e3 J.
When the counter is unsupported, or goes backwards (a reset: the counter is discarded), the sampled
board power is integrated over the sample timestamps with the trapezoid rule instead;
``energy_source`` says which ("counter" | "power_integral" | None). NVML power is a ~1 s moving
average on Ampere and newer, so a window under ~1 s is flagged (``short_window`` and ``note``).

NVML device order is not CUDA device order: the NVML handle is found by PCI bus id. Without a
CUDA device or NVML the sampler never raises: it still samples the process's resident memory from
``/proc/self/statm`` and the summary says ``available: False`` and why (``reason``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

THROTTLE_REASON_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the clocks were held down by power or heat: they look exactly like a regression.
THROTTLING_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
SHORT_WINDOW_S = 1.0
SHORT_WINDOW_NOTE = (
    "window under 1 s: NVML power is a ~1 s moving average and the energy counter updates every 20-100 ms, "
    "so power and energy figures lag the work"
)
# Per-rank keys that only a GPU fills in; the no-GPU summary carries them as None.
GPU_KEYS = (
    "device_name",
    "pci_bus_id",
    "driver_version",
    "energy_j",
    "energy_source",
    "short_window",
    "note",
    "avg_power_w",
    "max_power_w",
    "avg_gpu_util_pct",
    "avg_mem_util_pct",
    "peak_memory_used_bytes",
    "peak_memory_allocated_bytes",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "max_temperature_c",
    "throttle_reasons_seen",
    "throttled",
    "pcie_tx_kbps_avg",
    "pcie_rx_kbps_avg",
)

# ---------------------------------------------------------------------------------------------
# Pure functions: PCI matching, throttle reasons, energy, summaries


def parse_pci_bus_id(bus_id: str | bytes) -> tuple[int, int, int]:
    """``"00000000:3B:00.0"`` (or ``b"0000:3b:00.0"``) → (domain, bus, device), each parsed as hex."""
    text = (bus_id.decode() if isinstance(bus_id, bytes) else bus_id).strip().strip("\x00")
    try:
        domain, bus, device_function = text.split(":")
        return int(domain, 16), int(bus, 16), int(device_function.split(".")[0], 16)
    except ValueError as e:
        raise ValueError(f"PCI bus id {bus_id!r} is not DOMAIN:BUS:DEVICE.FUNCTION in hex") from e


def match_nvml_index(cuda_pci: tuple[int, int, int], nvml_bus_ids: Sequence[str | bytes]) -> int | None:
    """Index in ``nvml_bus_ids`` (NVML order) of the device at ``cuda_pci`` = (domain, bus, device), or None."""
    for index, bus_id in enumerate(nvml_bus_ids):
        if parse_pci_bus_id(bus_id) == tuple(cuda_pci):
            return index
    return None


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clocks-event (throttle) bitmask, in bit order; unknown bits are dropped."""
    return [name for bit, name in THROTTLE_REASON_BITS.items() if mask & bit]


def is_throttled(reasons: Iterable[str]) -> bool:
    """True when any reason is a power or thermal cap (not gpu_idle, sync_boost, clock settings)."""
    return not THROTTLING_REASONS.isdisjoint(reasons)


def counter_energy_j(start_mj: int | None, end_mj: int | None) -> float | None:
    """Energy between two counter readings (mJ) in J; None if a reading is missing or the counter reset (Δ < 0)."""
    if start_mj is None or end_mj is None or end_mj < start_mj:
        return None
    return (end_mj - start_mj) / 1e3


def power_integral_j(times_s: Sequence[float], powers_w: Sequence[float]) -> float | None:
    """Trapezoid-rule ∫ power dt in J over the sample timestamps; None with fewer than two samples."""
    if len(times_s) < 2:
        return None
    return float(np.trapezoid(np.asarray(powers_w, dtype=np.float64), np.asarray(times_s, dtype=np.float64)))


def window_energy(
    start_mj: int | None, end_mj: int | None, times_s: Sequence[float], powers_w: Sequence[float]
) -> tuple[float | None, str | None]:
    """(energy J, source): the counter's delta when usable, else the power integral, else (None, None)."""
    energy = counter_energy_j(start_mj, end_mj)
    if energy is not None:
        return energy, "counter"
    energy = power_integral_j(times_s, powers_w)
    return (energy, "power_integral") if energy is not None else (None, None)


@dataclass(frozen=True)
class Sample:
    """One reading of the device and the process; a field is None when its query is unsupported."""

    t_s: float  # time.perf_counter() when taken
    host_rss_bytes: int | None  # resident set size of this process
    power_w: float | None = None  # board power, ~1 s moving average on Ampere+
    gpu_util_pct: float | None = None  # % of time any kernel ran
    mem_util_pct: float | None = None  # % of time device memory was read or written
    memory_used_bytes: int | None = None  # device memory in use, all processes
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    temperature_c: float | None = None
    throttle_mask: int | None = None  # clocks-event reasons bitmask
    pcie_tx_kbps: float | None = None
    pcie_rx_kbps: float | None = None


def _present(samples: Sequence[Sample], field: str) -> list:
    return [v for s in samples if (v := getattr(s, field)) is not None]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": float(min(values)), "median": float(np.median(values)), "max": float(max(values))}


def host_summary(samples: Sequence[Sample], window_s: float, peak_rusage_bytes: int) -> dict[str, Any]:
    """Window length, sample count and peak host memory = max(sampled RSS, the process's ru_maxrss)."""
    rss = _present(samples, "host_rss_bytes")
    return {
        "window_s": float(window_s),
        "samples": len(samples),
        "peak_sampled_host_memory_bytes": max(rss) if rss else None,
        "peak_host_memory_bytes": int(max([*rss, peak_rusage_bytes])),
    }


def gpu_summary(
    samples: Sequence[Sample], energy_start_mj: int | None, energy_end_mj: int | None, window_s: float
) -> dict[str, Any]:
    """The device half of a per-rank summary, from the samples and the two energy-counter readings."""
    powered = [s for s in samples if s.power_w is not None]
    energy, source = window_energy(
        energy_start_mj, energy_end_mj, [s.t_s for s in powered], [s.power_w for s in powered]
    )
    power = [s.power_w for s in powered]
    masks = _present(samples, "throttle_mask")
    reasons = sorted({name for m in masks for name in decode_throttle_reasons(m)})
    memory, temperature = _present(samples, "memory_used_bytes"), _present(samples, "temperature_c")
    short = window_s < SHORT_WINDOW_S
    return {
        "energy_j": energy,
        "energy_source": source,
        "short_window": short,
        "note": SHORT_WINDOW_NOTE if short else None,
        "avg_power_w": _mean(power),
        "max_power_w": float(max(power)) if power else None,
        "avg_gpu_util_pct": _mean(_present(samples, "gpu_util_pct")),
        "avg_mem_util_pct": _mean(_present(samples, "mem_util_pct")),
        "peak_memory_used_bytes": int(max(memory)) if memory else None,
        "sm_clock_mhz": _spread(_present(samples, "sm_clock_mhz")),
        "mem_clock_mhz": _spread(_present(samples, "mem_clock_mhz")),
        "max_temperature_c": float(max(temperature)) if temperature else None,
        "throttle_reasons_seen": reasons,
        "throttled": is_throttled(reasons) if masks else None,
        "pcie_tx_kbps_avg": _mean(_present(samples, "pcie_tx_kbps")),
        "pcie_rx_kbps_avg": _mean(_present(samples, "pcie_rx_kbps")),
    }


def _sum_or_none(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values))


def _rank_peak_memory(rank: dict[str, Any]) -> int | None:
    """GPU memory (NVML used, else torch allocated) when the rank had a GPU, else host memory."""
    if rank.get("available"):
        for key in ("peak_memory_used_bytes", "peak_memory_allocated_bytes"):
            if rank.get(key) is not None:
                return rank[key]
    return rank.get("peak_host_memory_bytes")


def combine_summaries(per_rank: Sequence[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Run-level summary over all ranks' summaries; ``tokens`` = tokens processed in the window, all ranks."""
    if not per_rank:
        raise ValueError("combine_summaries needs at least one rank's summary; got an empty list")
    available = all(r.get("available") for r in per_rank)
    reason = next((f"rank {i}: {r.get('reason')}" for i, r in enumerate(per_rank) if not r.get("available")), None)
    energy = _sum_or_none([r.get("energy_j") for r in per_rank])
    sources = {r.get("energy_source") for r in per_rank}
    max_power = [r["max_power_w"] for r in per_rank if r.get("max_power_w") is not None]
    peaks = [p for r in per_rank if (p := _rank_peak_memory(r)) is not None]
    host_peaks = [r["peak_host_memory_bytes"] for r in per_rank if r.get("peak_host_memory_bytes") is not None]
    return {
        "available": available,
        "reason": reason,
        "gpus": sum(1 for r in per_rank if r.get("available")),
        "tokens": tokens,
        "energy_j": energy,
        "energy_j_per_token": energy / tokens if energy is not None and tokens > 0 else None,
        "energy_source": (next(iter(sources)) if len(sources) == 1 else "mixed") if energy is not None else None,
        "avg_power_w": _sum_or_none([r.get("avg_power_w") for r in per_rank]),  # total board power
        "max_power_w": max(max_power) if max_power else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_host_memory_bytes": max(host_peaks) if host_peaks else None,
        "throttled": any(bool(r.get("throttled")) for r in per_rank),
        "throttle_reasons_seen": sorted({n for r in per_rank for n in r.get("throttle_reasons_seen") or []}),
        "window_s": max(float(r.get("window_s") or 0.0) for r in per_rank),
        "per_rank": list(per_rank),
    }


# ---------------------------------------------------------------------------------------------
# Readers: host memory, NVML


def host_rss_bytes() -> int | None:
    """This process's resident set size from /proc/self/statm (pages × page size); None where unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_host_peak() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int | None:
    """Peak RSS since the last ``reset_host_peak`` (VmHWM in /proc/self/status); None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rusage_bytes() -> int:
    """The process's lifetime peak RSS (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlDevice:
    """The NVML handle of one CUDA device and the queries the sampler makes; unsupported queries read None."""

    def __init__(self, nvml: ModuleType, handle: Any, bus_id: str):
        self.nvml, self.handle, self.bus_id = nvml, handle, bus_id
        self.name = _text(self._query("nvmlDeviceGetName") or "unknown")
        try:
            self.driver_version: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self.driver_version = None

    def _query(self, fn_name: str, *args: Any) -> Any:
        fn = getattr(self.nvml, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:  # not supported on this device or driver: recorded as absent
            return None

    def energy_mj(self) -> int | None:
        return self._query("nvmlDeviceGetTotalEnergyConsumption")

    def sample(self, t_s: float, rss: int | None) -> Sample:
        nvml, q = self.nvml, self._query
        power_mw, util, memory = (
            q("nvmlDeviceGetPowerUsage"),
            q("nvmlDeviceGetUtilizationRates"),
            q("nvmlDeviceGetMemoryInfo"),
        )
        throttle = q("nvmlDeviceGetCurrentClocksEventReasons")
        if throttle is None:
            throttle = q("nvmlDeviceGetCurrentClocksThrottleReasons")
        return Sample(
            t_s=t_s,
            host_rss_bytes=rss,
            power_w=power_mw / 1e3 if power_mw is not None else None,
            gpu_util_pct=util.gpu if util is not None else None,
            mem_util_pct=util.memory if util is not None else None,
            memory_used_bytes=memory.used if memory is not None else None,
            sm_clock_mhz=q("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
            mem_clock_mhz=q("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM),
            temperature_c=q("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU),
            throttle_mask=throttle,
            pcie_tx_kbps=q("nvmlDeviceGetPcieThroughput", nvml.NVML_PCIE_UTIL_TX_BYTES),
            pcie_rx_kbps=q("nvmlDeviceGetPcieThroughput", nvml.NVML_PCIE_UTIL_RX_BYTES),
        )

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


def open_nvml_device(device: torch.device) -> tuple[NvmlDevice | None, str | None]:
    """(NVML device for ``device``, None), or (None, one-line reason) when there is none; never raises.

    1. a CPU run has no GPU; 2. import pynvml lazily (tests inject a fake); 3. nvmlInit;
    4. the CUDA device's PCI address from torch; 5. find it among NVML's devices by bus id.
    """
    if device.type != "cuda":
        return None, f"no CUDA device: the run used the {device.type.upper()}"
    try:
        import pynvml
    except Exception as e:
        return None, f"pynvml import failed: {type(e).__name__}: {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return None, f"NVML init failed: {type(e).__name__}: {e}"
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        cuda_pci = (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        bus_ids = [_text(pynvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]
        match = match_nvml_index(cuda_pci, bus_ids)
        if match is None:
            reason = (
                f"no NVML device has the PCI address {cuda_pci[0]:04x}:{cuda_pci[1]:02x}:{cuda_pci[2]:02x} of {device}"
            )
        else:
            return NvmlDevice(pynvml, handles[match], bus_ids[match]), None
    except Exception as e:
        reason = f"NVML device lookup for {device} failed: {type(e).__name__}: {e}"
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()
    return None, reason


# ---------------------------------------------------------------------------------------------
# The sampler


class Sampler:
    """``with Sampler(device, interval_s=0.1) as s: ...``, then ``s.summary()``: one rank's window, JSON-able.

    A daemon thread samples every ``interval_s`` (plus one sample at enter and one at exit); it sleeps
    on an Event, so exit stops it at once, and it shares nothing with the main thread but an
    append-only list that is read after the thread is joined.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.1):
        if not interval_s > 0:
            raise ValueError(f"Sampler interval_s must be > 0 seconds; got {interval_s!r}")
        self.device, self.interval_s = torch.device(device), float(interval_s)
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu: NvmlDevice | None = None
        self._reason: str | None = None
        self._error: str | None = None
        self._energy_start_mj: int | None = None
        self._t0 = 0.0
        self._summary: dict[str, Any] | None = None

    def _sample(self) -> Sample:
        t_s, rss = time.perf_counter(), host_rss_bytes()
        return self._gpu.sample(t_s, rss) if self._gpu is not None else Sample(t_s, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._samples.append(self._sample())
            except Exception as e:  # a sampler must never take the run down; the summary reports it
                self._error = f"{type(e).__name__}: {e}"
                return

    def __enter__(self) -> Sampler:
        self._gpu, self._reason = open_nvml_device(self.device)
        self._samples, self._stop, self._error, self._summary = [], threading.Event(), None, None
        # Peaks cover this window only, also when one process runs many windows (under torchrun).
        self._host_peak_reset = reset_host_peak()
        if self.device.type == "cuda":
            with contextlib.suppress(RuntimeError, AttributeError):  # not resettable: the peak spans more
                torch.cuda.reset_peak_memory_stats(self.device)
        if self._gpu is not None:
            torch.cuda.synchronize(self.device)  # sync: the window opens when earlier queued work is done
            self._energy_start_mj = self._gpu.energy_mj()
        self._t0 = time.perf_counter()
        self._samples.append(self._sample())
        self._thread = threading.Thread(target=self._run, name="moebench-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._thread is not None, "Sampler.__exit__ without __enter__"
        try:
            if self._gpu is not None and exc_type is None:
                torch.cuda.synchronize(self.device)  # sync: the window closes when the timed work is done
            window_s = time.perf_counter() - self._t0
            energy_end_mj = self._gpu.energy_mj() if self._gpu is not None else None
            self._samples.append(self._sample())
        finally:
            self._stop.set()
            self._thread.join()
            if self._gpu is not None:
                self._gpu.close()
        self._summary = self._build(window_s, energy_end_mj)

    def _build(self, window_s: float, energy_end_mj: int | None) -> dict[str, Any]:
        samples = sorted(self._samples, key=lambda s: s.t_s)  # the exit sample may race the thread's last one
        head = {"available": self._gpu is not None, "reason": self._reason, "device": str(self.device)}
        window_peak = host_peak_bytes() if self._host_peak_reset else None
        host = host_summary(samples, window_s, window_peak if window_peak is not None else peak_rusage_bytes())
        host["host_peak_scope"] = "window" if window_peak is not None else "process lifetime"
        tail = {"interval_s": self.interval_s, "sampler_error": self._error}
        if self._gpu is None:
            return head | dict.fromkeys(GPU_KEYS) | host | tail
        gpu = self._gpu
        info = {"device_name": gpu.name, "pci_bus_id": gpu.bus_id, "driver_version": gpu.driver_version}
        info["peak_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return head | info | gpu_summary(samples, self._energy_start_mj, energy_end_mj, window_s) | host | tail

    def summary(self) -> dict[str, Any]:
        """The per-rank summary (plain floats, ints, strings, lists, dicts); only after the ``with`` block."""
        if self._summary is None:
            raise RuntimeError("Sampler.summary() is available after the `with Sampler(...)` block has exited")
        return dict(self._summary)

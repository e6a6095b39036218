"""Does NVML answer for this GPU? Read the telemetry once, as a run does, around a short matmul burn.

``python -m moebench.tools.gpu_telemetry_check [--device cuda[:N]] [--seconds 1.0] [--json PATH]`` opens
the GPU's NVML handle the way ``moebench.measure.telemetry`` does (matched by PCI bus id), reads the total
energy counter, burns ``--seconds`` of bf16 [4096, 4096] matmuls inside a ``Sampler`` window, reads
the counter again, and prints what was read: energy (counter and sampler), power, SM and memory
clocks, temperature, throttle reasons, PCIe throughput. ``--json PATH`` writes it all.

Exit 0 when every required reading came back (``problems`` is empty), 1 when one did not (each named
in one line), 2 when no CUDA device is visible. Required: NVML matched the device by bus id (and
agrees with torch's bus id), the raw counter increased across the burn, the sampler's energy came
from that counter and is > 0, power and the SM clock were read. Throttle reasons, PCIe and
temperature are printed, not required: some boards and virtual machines do not report them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from moebench.measure.telemetry import Sampler, open_nvml_device, parse_pci_bus_id

BURN_SIDE = 4096  # one bf16 matmul: 2·4096³ ≈ 0.14 TFLOP, well under a millisecond on a Hopper GPU


def torch_pci(device: torch.device) -> tuple[int, int, int]:
    """(domain, bus, device) of a CUDA device as torch reports it."""
    props = torch.cuda.get_device_properties(device)
    return props.pci_domain_id, props.pci_bus_id, props.pci_device_id


def problems(summary: dict, start_mj: int | None, end_mj: int | None, cuda_pci: tuple[int, int, int]) -> list[str]:
    """What a GPU run's telemetry would lack, one line each; empty when every required reading came back."""
    if not summary.get("available"):
        return [f"NVML not available for the device: {summary.get('reason')}"]
    found = []
    bus = summary.get("pci_bus_id")
    if bus is None or parse_pci_bus_id(bus) != tuple(cuda_pci):
        found.append(f"NVML bus id {bus} is not torch's {cuda_pci[0]:04x}:{cuda_pci[1]:02x}:{cuda_pci[2]:02x}")
    if start_mj is None or end_mj is None:
        found.append("the total energy counter (nvmlDeviceGetTotalEnergyConsumption) could not be read")
    elif end_mj <= start_mj:
        found.append(f"the energy counter did not increase across the burn: {start_mj} -> {end_mj} mJ")
    if summary.get("energy_source") != "counter" or not (summary.get("energy_j") or 0) > 0:
        found.append(f"sampler energy {summary.get('energy_j')} J from {summary.get('energy_source')}, not the counter")
    if not (summary.get("max_power_w") or 0) > 0:
        found.append(f"no board power read (max_power_w = {summary.get('max_power_w')})")
    if summary.get("sm_clock_mhz") is None:
        found.append("no SM clock read")
    return found


def burn(device: torch.device, seconds: float) -> dict:
    """bf16 matmuls until ``seconds`` have passed (checked every 20, after a sync); their count and rate."""
    a = torch.randn(BURN_SIDE, BURN_SIDE, device=device, dtype=torch.bfloat16)
    matmuls, t0 = 0, time.perf_counter()
    while True:
        for _ in range(20):
            a @ a
        matmuls += 20
        torch.cuda.synchronize(device)  # sync: the elapsed time must cover the work queued so far
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"seconds": elapsed, "matmuls": matmuls, "tflops": 2 * BURN_SIDE**3 * matmuls / elapsed / 1e12}


def check(device: torch.device, seconds: float, interval_s: float) -> dict:
    """1. NVML handle by bus id; 2. counter; 3. burn inside a Sampler window; 4. counter; 5. problems."""
    nvml, reason = open_nvml_device(device)
    start_mj = nvml.energy_mj() if nvml else None
    with Sampler(device, interval_s=interval_s) as sampler:
        work = burn(device, seconds)
    end_mj = nvml.energy_mj() if nvml else None
    if nvml:
        nvml.close()
    summary = sampler.summary()
    cuda_pci = torch_pci(device)
    found = problems(summary, start_mj, end_mj, cuda_pci) if nvml else [f"NVML not available: {reason}"]
    return {
        "device": str(device),
        "torch_pci": "{:04x}:{:02x}:{:02x}".format(*cuda_pci),
        "raw_energy_mj": [start_mj, end_mj],
        "burn": work,
        "summary": summary,
        "problems": found,
    }


def render(doc: dict) -> str:
    s = doc["summary"]
    start, end = doc["raw_energy_mj"]
    delta = f"{(end - start) / 1e3:.1f} J" if start is not None and end is not None else "not read"
    lines = [
        f"{s.get('device_name')} ({doc['device']}), NVML bus id {s.get('pci_bus_id')}, torch {doc['torch_pci']}, "
        f"driver {s.get('driver_version')}",
        f"burn: {doc['burn']['matmuls']} bf16 {BURN_SIDE}^3 matmuls in {doc['burn']['seconds']:.2f} s, "
        f"{doc['burn']['tflops']:.0f} TFLOP/s",
        f"energy counter: {start} -> {end} mJ ({delta}); sampler: {s.get('energy_j')} J from {s.get('energy_source')}",
        f"power: avg {s.get('avg_power_w')} W, max {s.get('max_power_w')} W; "
        f"temperature max {s.get('max_temperature_c')} C",
        f"clocks (min/median/max MHz): SM {s.get('sm_clock_mhz')}, memory {s.get('mem_clock_mhz')}",
        f"throttle reasons seen: {s.get('throttle_reasons_seen')} (throttled: {s.get('throttled')})",
        f"PCIe avg KB/s: tx {s.get('pcie_tx_kbps_avg')}, rx {s.get('pcie_rx_kbps_avg')}; samples {s.get('samples')}",
    ]
    lines += [f"PROBLEM: {p}" for p in doc["problems"]] or ["telemetry: every required reading came back"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the CUDA device to read (default: cuda, the current one)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the matmul burn (s)")
    parser.add_argument("--interval", type=float, default=0.05, help="sampler interval (s)")
    parser.add_argument("--json", help="also write everything read to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("gpu_telemetry_check: no CUDA device visible", file=sys.stderr)
        return 2
    doc = check(device, args.seconds, args.interval)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(render(doc))
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

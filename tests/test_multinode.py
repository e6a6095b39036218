"""The multi-node path: two ``torchrun`` agents (one rank each) meet at a c10d rendezvous and run a scenario.

Both agents run on this host and every address is loopback (the rendezvous endpoint, each agent's
``--local-addr``, gloo's interface), so the test needs no network; what users run across machines
differs only in the endpoint's address.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import tiny
from test_process_life import REPO

from moebench.launch.spawn import LOOPBACK_INTERFACE

TIMEOUT_S = 300  # both agents together; a healthy run takes seconds to a minute on a busy 2-core host


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(node_rank: int, port: int, scenario, out) -> list[str]:
    """One node's torchrun command: its agent hosts the rendezvous store on node 0, joins it on node 1."""
    return [
        sys.executable,  # torchrun as a module of this python (the script may belong to another env)
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=moebench-multinode-test",
        f"--rdzv-conf=is_host={int(node_rank == 0)},join_timeout={TIMEOUT_S}",
        f"--node-rank={node_rank}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "-m",
        "moebench",
        "run",
        str(scenario),
        "--world-size",
        "2",
        "--device",
        "cpu",
        "--no-telemetry",
        "--out",
        str(out),
    ]


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, ... (torchrun starts its ranks in sessions of their own)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(k) for k in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_descendants(kid)]
    return found


def _stop(agent: subprocess.Popen) -> None:
    """Stop an agent that is still running and every process under it: SIGTERM first (torchrun then
    stops its ranks), SIGKILL to whatever is left after a grace period."""
    if agent.poll() is not None:
        return
    below = _descendants(agent.pid)
    agent.terminate()
    try:
        agent.wait(timeout=10)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
    for pid in below:
        with contextlib.suppress(OSError):  # gone already; a reused pid runs something else, left alone
            if b"moebench" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo on the loopback interface 'lo' (Linux)")
def test_two_torchrun_nodes_at_a_c10d_rendezvous_run_equivalence_at_world_size_2(tmp_path):
    scenario = tiny(tmp_path, "eq", "equivalence", world="1", capacity=1.25, skew="zipf")  # --world-size makes it 2
    out, port = tmp_path / "out", _free_loopback_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path), "GLOO_SOCKET_IFNAME": LOOPBACK_INTERFACE}
    agents = [
        subprocess.Popen(
            _agent(node, port, scenario, out),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for agent in agents:
            _stop(agent)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)

    assert [p.name for p in out.iterdir()] == ["eq.json"]  # one result file, written by rank 0 only
    (run,) = json.loads((out / "eq.json").read_text())["runs"]
    assert run["status"] == "ok", run["error"]
    assert (run["world_size"], run["backend"], run["device"]) == (2, "gloo", "cpu")
    assert run["host"]["ranks"] == 1  # one rank on each node (torchrun's LOCAL_WORLD_SIZE), not two spawned here
    assert [c["pass"] for c in run["checks"]] == [True, True]  # output and gradients against the fp64 reference
    assert run["metrics"]["rel_error_forward"]["median"] < 1e-5 and run["metrics"]["rel_error_grad"]["median"] < 1e-5
    assert run["metrics"]["tokens_dropped"]["median"] > 0  # capacity 1.25 under zipf drops: the EP path was taken

"""Process life of spawned runs: a loopback-only rendezvous, ranks that die with ``moebench``, and
Ctrl-C that stops everything with one line and exit 130, keeping the finished results."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from test_cli import tiny

from moebench import runner
from moebench.cli import main
from moebench.launch.spawn import launch

REPO = Path(__file__).resolve().parent.parent


def scenario(folder: Path, name: str, repeats: int = 3, world: str = "2") -> Path:
    return tiny(folder, name=name, world=world, repeats=repeats)


# -------------------------------------------------------------------------------------------
# The rendezvous listens on loopback only


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening(pids: list[int]) -> list[str]:
    """The local addresses of every TCP socket the processes ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            (address, port), state, inode = fields[1].split(":"), fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                found.append(f"{_address(address)}:{int(port, 16)}")
    return found


def _sockets_of_the_run(ctx) -> list[str] | None:
    """On rank 0: what the parent and every rank listen on, while all of them are up."""
    pids = [None] * ctx.world_size
    dist.all_gather_object(pids, os.getpid(), group=ctx.group)
    found = _listening([os.getppid(), *pids]) if ctx.rank == 0 else None
    dist.barrier(group=ctx.group)
    return found


def _is_loopback(endpoint: str) -> bool:
    ip = ipaddress.ip_address(endpoint.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.multiproc
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_a_spawned_run_listens_on_loopback_only():
    endpoints = launch(_sockets_of_the_run, 2, device="cpu", backend="gloo")[0]
    assert endpoints, "the rendezvous store should be listening while the ranks run"
    assert [e for e in endpoints if not _is_loopback(e)] == []  # the store and gloo's pairs


def test_the_listening_check_sees_an_all_interfaces_socket():
    """The check above can fail: a socket bound to every interface reads as not loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        mine, port = _listening([os.getpid()]), s.getsockname()[1]
    assert mine == [f"0.0.0.0:{port}"] and not _is_loopback(mine[0])


# -------------------------------------------------------------------------------------------
# Ranks die with moebench; Ctrl-C is one line and exit 130


def _default_sigint() -> None:
    """SIGINT as a terminal's foreground job has it: a shell's background job (``nox -s slow &``) starts
    with SIGINT ignored, which its children inherit, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _moebench(args: list, tmp: Path) -> subprocess.Popen:
    """``moebench ARGS`` in a process group of its own (as a terminal's foreground job), temp dir ``tmp``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "moebench", *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, text=True, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_default_sigint
    )


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (zombies count as gone), less multiprocessing's helper."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            helper = b"resource_tracker" in (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and not helper:
            found.append(int(stat.parent.name))
    return found


def _kill(proc: subprocess.Popen, ranks: list[int]) -> None:
    """Clean up after a failed test: moebench and any rank it left behind."""
    proc.kill()
    proc.wait()
    proc.stderr.close()
    for pid in _alive(ranks):
        os.kill(pid, signal.SIGKILL)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _runs_in(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["runs"])
    except (OSError, ValueError):
        return 0


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.0, 3.0], ids=["while-ranks-start", "while-ranks-run"])
def test_ranks_die_with_a_killed_moebench_and_leave_no_temp_files(tmp_path, after_s):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, ranks = _moebench(["run", scenario(tmp_path, "slow", repeats=100_000), "--out", tmp_path / "out"], tmp), []
    try:
        ranks = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 120, "two ranks")
        time.sleep(after_s)
        proc.kill()
        proc.wait(timeout=30)
        _wait_for(lambda: not _alive(ranks), 10, f"ranks {ranks} to die with their parent")
    finally:
        _kill(proc, ranks)
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("moebench-")) == []


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_stops_the_ranks_keeps_finished_runs_and_exits_130_with_one_line(tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    quick, slow = scenario(tmp_path, "a-quick", world="[1, 2]"), scenario(tmp_path, "b-slow", repeats=100_000)
    proc, ranks = _moebench(["run", quick, slow, "--out", out], tmp), []
    try:
        _wait_for(lambda: _runs_in(out / "a-quick.json") == 2, 300, "the quick scenario's two runs")
        ranks = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), 120, "the slow run's ranks")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        _kill(proc, ranks)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == f"moebench: interrupted; 2 finished runs kept in {out}/"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    _wait_for(lambda: not _alive(ranks), 10, "the ranks to stop")
    assert _runs_in(out / "a-quick.json") == 2
    assert not (out / "b-slow.json").exists()


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_while_the_first_ranks_start_never_hangs_and_leaves_no_empty_out_folder(tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    proc, ranks = _moebench(["run", scenario(tmp_path, "slow", repeats=100_000), "--out", out], tmp), []
    try:
        ranks = _wait_for(lambda: _children(proc.pid), 120, "the ranks to start")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill(proc, ranks)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "moebench: interrupted; no run finished"
    assert "Traceback" not in err
    _wait_for(lambda: not _alive(ranks), 10, "the ranks to stop")
    assert not out.exists()


# -------------------------------------------------------------------------------------------
# The same, in process: an interrupt between runs


def _interrupt_on_call(monkeypatch, n: int) -> None:
    real, calls = runner.run_one, []

    def run_one(spec, *args):
        calls.append(spec)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(spec, *args)

    monkeypatch.setattr(runner, "run_one", run_one)


@pytest.mark.slow
@pytest.mark.multiproc
def test_an_interrupt_after_a_finished_run_keeps_its_result_and_says_so(tmp_path, monkeypatch, capsys):
    _interrupt_on_call(monkeypatch, 2)
    out = tmp_path / "out"
    assert main(["run", str(scenario(tmp_path, "pair", world="[1, 2]")), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"moebench: interrupted; 1 finished run kept in {out}/"
    assert len(json.loads((out / "pair.json").read_text())["runs"]) == 1


def test_an_interrupt_before_any_result_removes_the_out_folder_it_created(tmp_path, monkeypatch, capsys):
    _interrupt_on_call(monkeypatch, 1)
    out = tmp_path / "new" / "out"
    assert main(["run", str(scenario(tmp_path, "pair", world="[1, 2]")), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "moebench: interrupted; no run finished"
    assert not (tmp_path / "new").exists()


def test_an_interrupt_keeps_an_out_folder_that_was_there_before(tmp_path, monkeypatch, capsys):
    _interrupt_on_call(monkeypatch, 1)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["run", str(scenario(tmp_path, "pair", world="[1, 2]")), "--out", str(out)]) == 130
    assert out.is_dir()


# -------------------------------------------------------------------------------------------
# Ctrl-C at any point of the command's life is exit 130: a stand-in for the console script that
# stalls at one point, so the signal lands there every time rather than by luck of timing

STALLING_ENTRY = """
import atexit, os, sys, time
from moebench import cli, runner

def stall():
    print(f"stalled at {point}", file=sys.stderr, flush=True)
    time.sleep(60)

if __name__ == "__main__":  # not in the processes multiprocessing starts, which import this file
    point = os.environ["STALL_AT"]
    if point == "before-the-command":
        real_parser = cli._parser
        cli._parser = lambda: (stall(), real_parser())[1]
    elif point == "printing-the-last-table":  # its result file is written; the table is next
        real_render = runner.render
        runner.render = lambda *a, **k: (stall(), real_render(*a, **k))[1]
    elif point == "interpreter-shutdown":
        atexit.register(stall)
    code = cli.main()  # as the console script calls it: sys.exit(main())
    if point == "after-main-returned":
        stall()
    sys.exit(code)
"""


def _stalled_run(tmp_path: Path, point: str, args: list) -> tuple[int, str, str]:
    """Run ``moebench ARGS`` through the stalling entry and Ctrl-C it (the whole process group, as a
    terminal does) once it reports the stall; (exit code, stdout, stderr)."""
    entry, out, err = tmp_path / "entry.py", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    entry.write_text(STALLING_ENTRY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "STALL_AT": point}
    with out.open("w") as out_f, err.open("w") as err_f:
        cmd = [sys.executable, str(entry), *map(str, args)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_f, stderr=err_f, start_new_session=True)
    try:
        _wait_for(lambda: "stalled at" in err.read_text() or proc.poll() is not None, 120, "the stall")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out.read_text(), err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["before-the-command", "printing-the-last-table", "after-main-returned", "interpreter-shutdown"]
)
def test_ctrl_c_at_any_point_of_a_run_exits_130_and_keeps_whole_result_files(tmp_path, point):
    out = tmp_path / "out"
    code, stdout, stderr = _stalled_run(
        tmp_path, point, ["run", scenario(tmp_path, "one", repeats=1, world="1"), "--out", out]
    )
    assert f"stalled at {point}" in stderr
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    if point == "before-the-command":
        assert last == "moebench: interrupted (nothing was left half done)"
        assert not out.exists()
        return
    doc = json.loads((out / "one.json").read_text())  # whole: it parses, with the one run
    assert [run["status"] for run in doc["runs"]] == ["ok"]
    assert [p.name for p in out.iterdir()] == ["one.json"]  # no temporary file left beside it
    if point == "printing-the-last-table":  # the command is at work: it stops and says what it kept
        assert last == f"moebench: interrupted; 1 finished run kept in {out}/"
    else:  # the command had finished: its table is printed whole
        assert last == "moebench: interrupted (nothing was left half done)"
        table = stdout.strip().splitlines()
        assert table[0] == "one (throughput)" and any(row.endswith("  ok") for row in table), stdout

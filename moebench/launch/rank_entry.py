"""The first code a spawned rank runs: tie the rank's life to its parent's, then run its payload.

``launch`` starts every rank as ``python moebench/launch/rank_entry.py PARENT_PID RESULT_FD`` with the
pickled payload on stdin. Run as a script, this file is the process's first code, and it imports
only the standard library: the parent-death signal is set before the payload is unpickled (which
imports torch and moebench), so a rank never outlives a killed ``moebench``, even one killed while
the rank is still importing. Before the payload, the parent's ``multiprocessing`` preparation data
(sys.path, working folder, main module) is applied, so the payload unpickles here as it would in a
``multiprocessing`` child. The answer is pickled onto RESULT_FD: ``("ok", value)`` or
``("error", traceback text)``.
"""

import ctypes
import multiprocessing.spawn
import os
import pickle
import signal
import sys
import threading
import time
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (AttributeError, OSError):  # no prctl (not Linux): poll instead
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was set: it will never come
        os._exit(1)


def _poll_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    parent_pid, result_fd = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent_pid)
    ok = False
    try:
        preparation, payload = pickle.loads(sys.stdin.buffer.read())  # plain data: imports nothing
        multiprocessing.spawn.prepare(preparation)
        fn, args = pickle.loads(payload)
        answer, ok = pickle.dumps(("ok", fn(*args))), True
    except BaseException:
        answer = pickle.dumps(("error", traceback.format_exc()))
    with os.fdopen(result_fd, "wb") as out:
        out.write(answer)
    if not ok:
        # A failed rank (often a peer of a crashed one, its collective broken) exits at once: the
        # interpreter's teardown would destroy gloo's threads still running, and C++ would abort
        # with "terminate called without an active exception".
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()

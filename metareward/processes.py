"""Child processes that must not outlive the pipeline: the vLLM engine's and the training launcher's.

Each child leads a process group of its own (`start_new_session=True`), so everything it starts
(vLLM's workers, accelerate's ranks) can be signalled at once and waited for until the group is
empty: only then is its memory, GPU memory included, free again. Standard library only: the vLLM
environment imports this module too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# How long to wait for a child's process group to empty after a signal.
GROUP_EXIT_WAIT_S = 10.0

_PR_SET_PDEATHSIG = 1


def child_environment() -> dict[str, str]:
    """This process's environment for a child that imports this package: the same copy of it first
    on PYTHONPATH, and the hub offline (checkpoints are local folders by then)."""
    environment = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, environment.get("PYTHONPATH", "")) if p)
    environment.setdefault("HF_HUB_OFFLINE", "1")
    return environment


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux; a
    no-op elsewhere). Used as a child's `preexec_fn`, or first thing in a child's main."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def signal_group(group: int, signal_number: int) -> None:
    """Send `signal_number` to every process of `group`; a group already gone is fine."""
    try:
        os.killpg(group, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def wait_group_gone(process: subprocess.Popen, timeout_s: float = GROUP_EXIT_WAIT_S) -> bool:
    """Wait until no process is left in the group `process` leads (reaping it on the way); False
    when some are still there after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_group(process: subprocess.Popen) -> bool:
    """SIGKILL the group `process` leads and wait until it is empty (True) or the wait ran out."""
    signal_group(process.pid, signal.SIGKILL)
    return wait_group_gone(process)

"""One rank of a multi-process training run: `python -m metareward.train_worker JOB_JSON`.

Started by `accelerate launch` in the child process group that `metareward.training.run_child`
starts; reads the `TrainJob` spec file the parent wrote and runs `metareward.training.run_job`.
Each rank dies with the process that started it (PR_SET_PDEATHSIG, Linux): the parent's death
kills the launcher, the launcher's death kills the ranks, so no rank outlives the pipeline.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux; a
    no-op elsewhere). Used as `preexec_fn` of the launcher and first thing in each rank."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def main(argv: list[str]) -> None:
    die_with_parent()
    if len(argv) != 1:
        raise SystemExit("usage: python -m metareward.train_worker JOB_JSON")
    from metareward.training import TrainJob, run_job

    job = TrainJob.read(argv[0])
    fs = None
    if job.fs_json is not None:
        import fsspec

        fs = fsspec.AbstractFileSystem.from_json(job.fs_json)
    run_job(job, fs=fs)


if __name__ == "__main__":
    main(sys.argv[1:])

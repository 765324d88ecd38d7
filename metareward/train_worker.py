"""One rank of a multi-process training run: `python -m metareward.train_worker JOB_JSON`.

Started by `accelerate launch` in the child process group that `metareward.training.run_child`
starts; reads the `TrainJob` spec file the parent wrote and runs `metareward.training.run_job`.
Each rank dies with the process that started it (PR_SET_PDEATHSIG, Linux): the parent's death
kills the launcher, the launcher's death kills the ranks, so no rank outlives the pipeline.
"""

from __future__ import annotations

import sys

from metareward.processes import die_with_parent


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

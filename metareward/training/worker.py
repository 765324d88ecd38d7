"""One rank of a multi-process training run, started by `accelerate launch` or by Ray Train; both
run `metareward.training.job.run_job`, the function a one-process run calls in its own process.

`python -m metareward.training.worker JOB_JSON`: a rank under `accelerate launch`, in the child
process group that `metareward.training.accelerate_launch.run_child` starts; reads the `TrainJob`
spec file the parent wrote. Each rank dies with the process that started it (PR_SET_PDEATHSIG,
Linux): the parent's death kills the launcher, the launcher's death kills the ranks, so no rank
outlives the pipeline.

`train_loop_per_worker`: a Ray Train worker (`metareward.training.ray_train.run_ray_train`); Ray
ends the workers with the driver that owns them.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any

from metareward.processes import die_with_parent


def main(argv: list[str]) -> None:
    die_with_parent()
    if len(argv) != 1:
        raise SystemExit("usage: python -m metareward.training.worker JOB_JSON")
    from metareward.training.job import TrainJob, run_job

    job = TrainJob.read(argv[0])
    fs = None
    if job.fs_json is not None:
        import fsspec

        fs = fsspec.AbstractFileSystem.from_json(job.fs_json)
    run_job(job, fs=fs)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of `loop_config["spec"]` (a `RayTrainSpec`). torch.distributed is set
    up by Ray Train, with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR in the environment, where
    accelerate (under TRL) finds them. The node's first worker materializes the base and writes the
    job's files and spec into a scratch folder of the node while the others wait, as the parent does
    for the accelerate ranks; rank 0 saves the checkpoints to the run's storage and puts its
    `TrainOutcome` in `spec.results`."""
    import ray.train
    import torch.distributed as dist

    from metareward.checkpoints import materialize
    from metareward.training.config import resolve_precision
    from metareward.training.job import TrainJob, local_job, run_job, save_outputs
    from metareward.training.scratch import scratch_folder, scratch_path

    spec = loop_config["spec"]
    context = ray.train.get_context()
    node_main = context.get_local_rank() == 0
    resolve_precision(spec.precision)  # bf16 on a GPU without it fails here, naming the setting
    # One folder for every worker of a node, named by the driver's token and held (locked) by the
    # node's first worker: Ray Train groups the ranks by node, so rank 0 is that worker and the
    # files last as long as it does; a killed node's folder is swept by the next training there.
    folder = scratch_folder(name=spec.token) if node_main else nullcontext(scratch_path(spec.token))
    with folder as scratch_dir:
        job_path = scratch_dir / "job.json"
        if node_main:
            job = local_job(
                spec.config, spec.precision, materialize(spec.base, spec.fs), spec.examples, scratch_dir,
                spec.state_uri, spec.resume_uri, spec.fs,
            )  # fmt: skip
            job.write(job_path)
        dist.barrier()
        job = TrainJob.read(job_path)
        run_job(job, fs=spec.fs)
        if context.get_world_rank() == 0:
            spec.results.put(save_outputs(job, spec.source, spec.output_uri, spec.adapter_uri, spec.fs))


if __name__ == "__main__":
    main(sys.argv[1:])

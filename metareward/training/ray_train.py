"""Training on Ray Train workers, the driver's side: the checks before a run, and the run.

Ray Train (`launcher: ray_train`): `num_processes` Ray Train workers (`TorchTrainer`, DDP) on the
cluster of `execution.ray` (`metareward.execution.connected`), one GPU each (nccl), or CPU workers
(gloo) when `execution.ray.gpus_per_engine` is 0, `cpus_per_engine` CPUs each. Each worker runs
`metareward.training.worker.train_loop_per_worker`: the node's first worker materializes the base and
writes the examples into a scratch folder of its node, then every worker runs `run_job`, the same
function the accelerate ranks run (Ray Train has set up torch.distributed and RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR; accelerate and TRL take them from there). Rank 0 saves M_i (and the
adapter) with `save_checkpoint` itself, straight to the run's storage, and hands the log history back
to the driver through a Ray queue. Storage: the workers read the base and rank 0 writes the outputs
and trainer checkpoints from whichever node it runs on, so with a cluster address the output,
adapter and state locations must be object storage (a local folder is refused), and a local base
(the embedded seed model) must be at the same path on every node. Ray Train's own run folder
(`RunConfig.storage_path`) is a scratch folder on the driver's node: its controller, which Ray
pins to that node, is the only writer, because no Ray Train checkpoint is reported. The
filesystem `fs` travels to the workers pickled, with the options it was built with (explicit
credentials included; credentials from each node's own environment or role do not travel).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metareward.checkpoints import ModelRef
from metareward.training.config import TrainingConfig, choose_precision
from metareward.training.job import TrainOutcome

if TYPE_CHECKING:
    from metareward.execution import RayExecutionConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayTrainSpec:
    """What every Ray Train worker needs (`train_loop_config["spec"]`): the base checkpoint (each
    node materializes it), the examples, the settings, where trainer checkpoints go and which to
    resume from, where rank 0 saves M_i and the adapter with which manifest `source`, the
    filesystem of those locations, and `results`, the Ray queue rank 0 puts its `TrainOutcome` in.
    `token` names the run's scratch folder on each node."""

    token: str
    base: ModelRef
    examples: list[dict[str, Any]]
    config: TrainingConfig
    precision: str
    state_uri: str | None
    resume_uri: str | None
    output_uri: str
    adapter_uri: str
    source: dict[str, Any]
    fs: Any
    results: Any = None


def ray_train_precision(precision: str, gpu_workers: bool) -> str:
    """`TrainingConfig.precision` for Ray Train workers, decided on the driver (which may have no
    GPU): `auto` is bf16 on GPU workers, fp32 on CPU workers. Each GPU worker checks bf16 support."""
    return choose_precision(
        precision, gpu_workers, "training.precision 'bf16' needs GPU workers, and execution.ray.gpus_per_engine 0 gives CPU workers"
    )


def require_ray_train() -> None:
    """Raise `ExecutionError` with the install hint unless Ray Train can be imported."""
    from metareward.execution import INSTALL_HINT, ExecutionError

    try:
        import ray.train.torch  # noqa: F401
    except ImportError as error:
        raise ExecutionError(f"training.launcher is 'ray_train' but {error.name} is not installed: {INSTALL_HINT}") from None


def check_ray_train_locations(ray: RayExecutionConfig, locations: dict[str, str | None]) -> None:
    """Refuse a cluster address with an output location (`locations`: name -> URI, None for
    unused) in a local folder, which rank 0, on whichever node it runs, may not be able to write."""
    from metareward.execution import ExecutionError

    if not ray.is_cluster:
        return
    for name, uri in locations.items():
        if uri is not None and fsspec_protocol(uri) == "file":
            raise ExecutionError(
                f"training.launcher is 'ray_train' on the cluster at execution.ray.address {ray.address!r}: rank 0 may "
                f"run on another machine, which cannot write the local folder {uri!r} ({name}); set storage.root to "
                "object storage (s3://bucket/prefix) every node can reach"
            )


def fsspec_protocol(uri: str) -> str:
    """'file' for a local path or file:// URL, else the URL's protocol ('s3')."""
    import fsspec.utils

    protocol = fsspec.utils.get_protocol(uri)
    return "file" if protocol in ("file", "local") else protocol


def check_worker_resources(cluster: dict[str, float], workers: int, per_worker: dict[str, float]) -> None:
    """Raise `ExecutionError` when the cluster's resources (`ray.cluster_resources()`) cannot hold
    `workers` x `per_worker` at once: Ray Train would wait for them forever."""
    from metareward.execution import ExecutionError

    for name, amount in per_worker.items():
        if cluster.get(name, 0.0) < workers * amount:
            raise ExecutionError(
                f"training.num_processes is {workers}: {workers} Ray Train workers need {workers * amount:g} {name} "
                f"({amount:g} each) and the Ray cluster has {cluster.get(name, 0.0):g}; lower training.num_processes"
                + (", or set execution.ray.gpus_per_engine to 0 for CPU workers" if name == "GPU" else ", or execution.ray.cpus_per_engine")
            )


def run_ray_train(spec: RayTrainSpec, ray: RayExecutionConfig, storage_dir: Path) -> TrainOutcome:
    """Run `spec` on `spec.config.num_processes` Ray Train workers of the cluster `ray` and return
    rank 0's outcome. `storage_dir`: Ray Train's run folder, on this machine (its controller runs
    here). A failed worker fails the run (no Ray-level retry: the stage's retry resumes from the
    trainer checkpoints). Raises `RuntimeError` naming the failure."""
    import ray as ray_module
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from metareward.execution import connected
    from metareward.training.worker import train_loop_per_worker

    gpu_workers = ray.gpus_per_engine > 0
    resources = {"CPU": ray.cpus_per_engine} | ({"GPU": 1} if gpu_workers else {})
    # Ray leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs: CPU workers must not see any.
    # Ray Train's print patch also writes what a library captures from stdout (dill's dis.dis under
    # datasets' fingerprinting: pages of bytecode per worker); plain stdout is forwarded all the same.
    worker_env = {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    worker_env |= {} if gpu_workers else {"CUDA_VISIBLE_DEVICES": ""}
    workers = spec.config.num_processes
    with connected(ray):
        check_worker_resources(ray_module.cluster_resources(), workers, resources)
        results = Queue(actor_options={"num_cpus": 0})
        try:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"spec": replace(spec, results=results)},
                torch_config=TorchConfig(backend="nccl" if gpu_workers else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu_workers, resources_per_worker=resources),
                run_config=RunConfig(
                    name=f"metareward-train-{spec.token}",
                    storage_path=str(storage_dir),
                    worker_runtime_env={"env_vars": worker_env},
                ),
            )
            logger.info("training on %d Ray Train worker(s), %s each, at %s", workers, resources, ray.address)
            try:
                trainer.fit()
            except TrainingFailedError as error:
                raise RuntimeError(f"training under Ray Train ({workers} workers) failed: {error}") from error
            try:
                return results.get(block=False)
            except Empty:
                raise RuntimeError("training under Ray Train ended without rank 0's result") from None
        finally:
            results.shutdown()

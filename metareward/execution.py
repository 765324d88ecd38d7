"""Where an iteration's work runs: this process (`local`) or a Ray cluster (`ray`), and the checks
that a Ray run can work before anything is submitted.

Config (`RunConfig.execution`, docs/scaling.md):

    execution:
      backend: ray              # local (default, needs no Ray) | ray (the `metareward[ray]` extra)
      ray:
        address: auto           # local | auto | HOST:PORT
        expected_gpus: 16       # checked before the first shard is submitted

With `ray`, the generation stages (actor, judge, meta-judge) run in one subflow whose Ray task
runner owns the cluster connection (`flows.generation`); with `training.launcher: ray_train`, DPO
runs under Ray Train. This module is Prefect-free: the config, the pre-flight checks, the
arguments of `ray.init` and a connection context for code that needs Ray outside a subflow.
Ray is imported only inside the functions that connect.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import time
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

LOCAL = "local"
AUTO = "auto"
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")

INSTALL_HINT = "install the Ray extra: pip install 'metareward[ray]' (prefect-ray and ray[train])"


class ExecutionError(RuntimeError):
    """A Ray execution setting that cannot work here; the message says what to change."""


def missing_extra(setting: str, error: ImportError) -> ExecutionError:
    """The error for `setting` (e.g. "execution.backend is 'ray'") when the import of the
    `metareward[ray]` extra failed with `error`."""
    return ExecutionError(f"{setting} but {error.name} is not installed: {INSTALL_HINT}")


class RayExecutionConfig(BaseModel):
    """How the stages use a Ray cluster (`execution.backend: ray`).

    Parameters:
        > Cluster

        address (`str`, *optional*, defaults to `"local"`):
            `local`: a Ray instance started on this machine for the generation subflow and gone
            when it ends (one node, its N GPUs). `auto`: the running cluster this driver belongs to
            (`RAY_ADDRESS`, or the cluster started on this node by `ray start`); with no cluster
            running the run fails at once instead of starting a one-machine Ray. `HOST:PORT`: the
            head node's GCS address. Every address but `local` means several machines: storage
            must be object storage and the Prefect API a server every node reaches.
        expected_gpus (`int`, *optional*, defaults to `0`):
            GPUs the cluster must have; checked after connecting and before any shard is
            submitted (a node that did not join fails the run instead of running slowly). Required
            (at least 1) for a cluster address; 0 skips the check with `local`.
        namespace (`str`, *optional*, defaults to `"metareward"`):
            Ray namespace of the run's jobs.

        > Shards

        gpus_per_engine (`float`, *optional*, defaults to `1.0`):
            GPUs one engine (one worker process holding the model) takes; 2 for a model served with
            `engine.tensor_parallel_size: 2`; 0 for CPU engines (tests, the embedded model).
        cpus_per_engine (`float`, *optional*, defaults to `1.0`):
            CPUs reserved per engine worker (Ray also sets its OMP_NUM_THREADS from it).
        min_shards_per_engine (`int`, *optional*, defaults to `8`):
            Guidance: with fewer shards than this per engine, the last shards leave GPUs idle; the
            subflow logs a warning with the `shard_size` that would give this many.
        max_shard_retries (`int`, *optional*, defaults to `3`):
            Times Ray runs a shard again when its worker process or node dies (a shard is written
            atomically, so a re-run shard is in the table exactly once).
        shard_timeout_s (`float`, *optional*, defaults to `0`):
            Deadline of one shard, from its start; 0 for none. Prefect's `timeout_seconds` is not
            enforced on Ray, so the subflow enforces this one: a shard past it has its worker
            killed and the stage fails naming it (the stage's retries then redo only the missing
            shards). The engines' own per-request timeouts (`engine.timeout_s`) apply inside.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"description": "How the stages use a Ray cluster: its address and what each engine takes."},
    )

    address: str = Field(
        default=LOCAL, description="`local` (Ray on this machine), `auto` (the running cluster) or the head's GCS `HOST:PORT`."
    )
    expected_gpus: int = Field(
        default=0, ge=0, description="GPUs the cluster must have, checked before any shard; at least 1 for a cluster address."
    )
    namespace: str = Field(default="metareward", description="Ray namespace of the run's jobs.")
    gpus_per_engine: float = Field(
        default=1.0, ge=0.0, description="GPUs one engine worker takes (2 for `tensor_parallel_size: 2`; 0 for CPU engines)."
    )
    cpus_per_engine: float = Field(default=1.0, gt=0.0, description="CPUs reserved per engine worker (also its OMP_NUM_THREADS).")
    min_shards_per_engine: int = Field(
        default=8, ge=1, description="Fewer shards per engine than this leave GPUs idle at the end: the subflow warns."
    )
    max_shard_retries: int = Field(default=3, ge=0, description="Times Ray runs a shard again when its worker or node dies.")
    shard_timeout_s: float = Field(
        default=0.0, ge=0.0, description="Deadline of one shard in seconds, from its start (its worker is killed); 0 = none."
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        if address in (LOCAL, AUTO) or _HOST_PORT.match(address):
            return address
        raise ValueError(f"must be 'local', 'auto' or HOST:PORT of the head node's GCS, got {address!r}")

    @property
    def is_cluster(self) -> bool:
        """True for every address but `local`: the work may run on other machines."""
        return self.address != LOCAL


class ExecutionConfig(BaseModel):
    """Where the stages run.

    Parameters:
        backend (`str`, *optional*, defaults to `"local"`):
            `local`: every stage in the flow's own process, shard after shard. `ray`: the shards of
            generate, judge and meta-judge as Ray tasks, one engine per GPU (`ray`).
        ray (`RayExecutionConfig`, *optional*):
            The cluster and the shards' resources; read with `backend: ray`, and by the train stage
            with `training.launcher: ray_train` (its workers' GPUs and CPUs).
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"description": "Where the stages run: this process or a Ray cluster."}
    )

    backend: Literal["local", "ray"] = Field(
        default="local", description="`local`: shard after shard in the flow's process; `ray`: generation shards as Ray tasks."
    )
    ray: RayExecutionConfig = Field(
        default_factory=RayExecutionConfig, description="The Ray cluster and the shards' resources (also read by `ray_train`)."
    )


def check_ray_execution(ray: RayExecutionConfig, storage_root: str, storage_protocol: str, prefect_api_url: str | None) -> None:
    """Refuse, before anything starts, a Ray setup whose workers could not reach the run's data or
    the Prefect API. `prefect_api_url` is the configured `PREFECT_API_URL` (None: the temporary
    API Prefect starts inside this process). That prefect-ray is installed is checked by the
    Prefect shell (`flows.generation.check_execution`), before this."""
    try:
        import ray as _ray  # noqa: F401
    except ImportError as error:
        raise missing_extra("execution.backend is 'ray'", error) from None
    if not ray.is_cluster:
        return
    if ray.expected_gpus < 1:
        raise ExecutionError(
            f"execution.ray.address is {ray.address!r} (a cluster): set execution.ray.expected_gpus to the GPUs the "
            "cluster must have, so a node that did not join fails the run before it starts"
        )
    if storage_protocol == "file":
        raise ExecutionError(
            f"execution.ray.address is {ray.address!r}: shards run on other machines, which cannot see the local "
            f"folder {storage_root!r}; set storage.root to object storage (s3://bucket/prefix) every node can reach"
        )
    if not prefect_api_url:
        raise ExecutionError(
            f"execution.ray.address is {ray.address!r}: the shards' Prefect task runs report from other machines, "
            "which cannot reach the temporary API this process started; run a Prefect server every node can reach "
            "(prefect server start --host ADDRESS) and set PREFECT_API_URL=http://ADDRESS:4200/api"
        )


def ray_init_kwargs(ray: RayExecutionConfig) -> dict:
    """The keyword arguments of `ray.init` for this config. `auto` is passed as the address itself,
    which raises when no cluster is running (a bare `ray.init()` would start a local one)."""
    kwargs: dict = {"namespace": ray.namespace, "logging_level": logging.WARNING, "log_to_driver": True}
    if ray.is_cluster:
        kwargs["address"] = ray.address
    else:
        kwargs["include_dashboard"] = False
    return kwargs


def explain_connection_error(ray: RayExecutionConfig, error: Exception) -> ExecutionError:
    """The error to raise when `ray.init` fails for this config."""
    if ray.address == AUTO:
        return ExecutionError(
            "execution.ray.address is 'auto' but no running Ray cluster was found from this machine (RAY_ADDRESS "
            "unset and no `ray start` on this node); start the cluster first, run the flow on one of its nodes, or "
            f"set execution.ray.address to the head's HOST:PORT ({error})"
        )
    return ExecutionError(f"cannot connect to the Ray cluster at {ray.address!r}: {error}")


def check_auto_finds_a_cluster(ray: RayExecutionConfig) -> None:
    """For `address: auto`: refuse at once when Ray's own discovery (RAY_ADDRESS, the address `ray
    start` recorded on this node, a running GCS process) finds no cluster from here, the way
    `ray.init(address="auto")` would fail once the stages start. Reads; connects to nothing."""
    if ray.address != AUTO:
        return
    # What ray.init resolves "auto" with (private, hence the pinned ray minor version).
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        canonicalize_bootstrap_address_or_die(AUTO)
    except ConnectionError as error:
        raise explain_connection_error(ray, error) from None


def check_cluster_gpus(ray: RayExecutionConfig, cluster_gpus: float) -> None:
    """Raise when a connected cluster has fewer GPUs than `expected_gpus`."""
    if ray.expected_gpus and cluster_gpus < ray.expected_gpus:
        raise ExecutionError(
            f"the Ray cluster at {ray.address!r} has {cluster_gpus:g} GPUs, execution.ray.expected_gpus is "
            f"{ray.expected_gpus}: wait for the missing nodes to join (ray status) or lower expected_gpus"
        )


def engine_slots(ray: RayExecutionConfig, cluster_gpus: float, cluster_cpus: float) -> int:
    """How many engines the cluster runs at once: by GPUs, or by CPUs for CPU engines."""
    if ray.gpus_per_engine > 0:
        return max(1, int(cluster_gpus // ray.gpus_per_engine))
    return max(1, int(cluster_cpus // ray.cpus_per_engine))


def shard_size_advice(ray: RayExecutionConfig, prompts: int, shard_size: int, engines: int) -> str | None:
    """A warning when `prompts` in shards of `shard_size` give fewer than `min_shards_per_engine`
    shards per engine, with the shard size that would; None when the sharding is fine."""
    shards = max(1, math.ceil(prompts / shard_size))
    wanted = ray.min_shards_per_engine * engines
    if shards >= wanted or prompts <= shards:
        return None
    better = max(1, prompts // wanted)
    return (
        f"{prompts} prompts in shards of {shard_size} make {shards} shards for {engines} engine(s), fewer than "
        f"{ray.min_shards_per_engine} per engine: the last shards leave engines idle; shard_size: {better} "
        f"gives {math.ceil(prompts / better)} shards"
    )


def local_workers_still_running(workers: list[str], timeout_s: float) -> list[str]:
    """Of the worker processes named `host:pid`, those on this machine still running after waiting
    up to `timeout_s` for them to exit (workers on other machines cannot be seen from here)."""
    import psutil

    host = socket.gethostname()
    local = [worker for worker in workers if worker.rsplit(":", 1)[0] == host]
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [worker for worker in local if psutil.pid_exists(int(worker.rsplit(":", 1)[1]))]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


@contextlib.contextmanager
def connected(ray: RayExecutionConfig) -> Iterator[None]:
    """A Ray connection for this config for the duration of the block (reusing one that is already
    open, e.g. inside the generation subflow), closed at the end when this block opened it."""
    import ray as ray_module

    if ray_module.is_initialized():
        yield
        return
    try:
        ray_module.init(**ray_init_kwargs(ray))
    except ConnectionError as error:
        raise explain_connection_error(ray, error) from error
    try:
        check_cluster_gpus(ray, ray_module.cluster_resources().get("GPU", 0.0))
        yield
    finally:
        ray_module.shutdown()

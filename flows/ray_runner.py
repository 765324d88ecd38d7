"""The generation subflow's Ray task runner: prefect-ray's `RayTaskRunner`, connected the way
`execution.ray` says and checked before the subflow submits anything.

Imported only with `execution.backend: ray` (it needs the `metareward[ray]` extra). The runner
owns the connection: it opens it when the subflow starts and closes it when the subflow ends, so
the subflow's worker processes, their engines and their GPU memory are gone before DPO starts.
Nothing else in the flow process calls `ray.init()`.
"""

from __future__ import annotations

import ray
from prefect_ray import RayTaskRunner

from metareward.execution import (
    ExecutionError,
    RayExecutionConfig,
    check_cluster_gpus,
    explain_connection_error,
    ray_init_kwargs,
)


class ClusterTaskRunner(RayTaskRunner):
    """A `RayTaskRunner` for `execution.ray`: `auto` finds a running cluster or fails (prefect-ray
    would start a local one), and the cluster's GPUs are checked right after connecting."""

    def __init__(self, settings: RayExecutionConfig):
        self.settings = settings
        # The address travels in init_kwargs: prefect-ray drops "auto" from its own `address`.
        super().__init__(address=None, init_kwargs=ray_init_kwargs(settings))

    def duplicate(self) -> ClusterTaskRunner:
        return type(self)(self.settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterTaskRunner) and other.settings == self.settings

    def __enter__(self) -> ClusterTaskRunner:
        # Prefect also enters a copy of the flow's task runner inside each Ray worker, to rebuild the
        # flow's context around a shard: there Ray is connected already and nothing is checked.
        connecting = not ray.is_initialized()
        try:
            super().__enter__()
        except ConnectionError as error:
            raise explain_connection_error(self.settings, error) from error
        if not connecting:
            return self
        try:
            resources = ray.cluster_resources()
            gpus = float(resources.get("GPU", 0.0))
            check_cluster_gpus(self.settings, gpus)
            if self.settings.gpus_per_engine > gpus:
                raise ExecutionError(
                    f"the Ray cluster has {gpus:g} GPUs and one engine takes execution.ray.gpus_per_engine = "
                    f"{self.settings.gpus_per_engine:g}: no shard could ever start; set gpus_per_engine: 0 for "
                    "engines on CPUs"
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

"""The input files' check as a Prefect task: runs started from the UI or a deployment never passed
the CLI's check (`metareward.inputs.check_inputs`), and an S3 outage while it reads them is retried
like any storage fault instead of failing the run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from metareward.config import RunConfig
from metareward.inputs import check_inputs
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault


@task(name="check-inputs", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def check_inputs_task(config: RunConfig, evaluation: bool | None = None) -> None:
    """Refuse bad prompt or preference files naming file, row and column; log the notes."""
    for note in check_inputs(config, evaluation, source=f"run {config.name}"):
        get_run_logger().warning(note)

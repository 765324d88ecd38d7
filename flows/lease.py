"""The run's writer lease (`metareward.lease`) inside a flow.

`flow_run_lease` holds the run's lease for a flow's body. When the caller holds it already (the
`metareward` command takes it before Prefect starts; the run flow holds it for its evaluation
subflows), the flow uses that one and records its flow run in it. Otherwise the `take-run-lease`
task takes it: a storage outage at the start of a run is retried like any storage task
(`tasks.retries`, shown in the UI), and another writer's lease comes back as a value, so the flow
can end with its one message instead of a task's traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from metareward.lease import RunLease, RunLeaseHeld, held_lease, hold_run_lease
from metareward.storage import StorageConfig
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault


@task(name="take-run-lease", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def take_run_lease(storage: StorageConfig, run: str, flow_run_id: str | None, flow_run_name: str | None) -> RunLease | RunLeaseHeld:
    """The run's lease, acquired (an expired one taken over), or the `RunLeaseHeld` naming its holder."""
    lease = RunLease(storage, run, flow_run_id=flow_run_id, flow_run_name=flow_run_name)
    try:
        return lease.acquire(attempts=1)  # transient faults: this task's retries
    except RunLeaseHeld as refused:
        return refused


@contextmanager
def flow_run_lease(storage: StorageConfig, run: str) -> Iterator[RunLease]:
    """Hold the run's writer lease for the block; `RunLeaseHeld` when another writer has it."""
    flow_run_id, flow_run_name = flow_run.get_id(), flow_run.get_name()
    if held_lease(storage, run) is not None:
        with hold_run_lease(storage, run, flow_run_id=flow_run_id, flow_run_name=flow_run_name) as lease:
            yield lease
        return
    taken = take_run_lease(storage, run, flow_run_id, flow_run_name)
    if isinstance(taken, RunLeaseHeld):
        raise taken
    with hold_run_lease(storage, run, lease=taken) as lease:
        yield lease

"""The run's report as a small Prefect flow, so `metareward report` publishes its page as an
artifact of a flow run (Prefect deprecates artifacts made outside a run).

    metareward-report ({run}-report): run-report -> {root}/{run}/report/report.md and the
    `{run}-report` artifacts (tasks.report)
"""

from __future__ import annotations

from prefect import flow

from metareward.storage import StorageConfig
from tasks.report import run_report


@flow(name="metareward-report", flow_run_name="{run}-report")
def report_flow(storage: StorageConfig, run: str) -> str:
    """Write the report page of `run` (diagnostics of every complete iteration, trend plots) into
    its store and publish it to the Prefect UI; returns the page's URI."""
    return run_report(storage, run)

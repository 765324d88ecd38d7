"""Diagnostics in the Prefect UI: the `report` task ends each iteration, `run_report` serves
`metareward report` (through `flows.report`). A thin shell over `metareward.report`.

Artifacts, under stable keys (lowercase letters, digits and dashes, as `tasks.reporting`):

    {run}-iter-{i}-diagnostics-summary   markdown: the iteration's plots and every metric, by role
    {run}-iter-{i}-diagnostics-rows      table: metric, value (every column of the diagnostics row)
    {run}-report                         markdown: the run's page, trend plots and metrics per iteration
    {run}-report-rows                    table: one row per iteration, the metrics the page shows

Images: the Prefect UI renders markdown images by URL, and a browser will not load a file:// (or
private s3://) image into an http:// page, so the PNGs are inlined as base64 `data:image/png` URIs
(both Prefect 3.9 UIs allow that scheme for images; `docs/diagnostics.md`).

Not cached by `tasks.cache`: the task reuses the stored diagnostics whenever they were
computed from the artifacts there now (`metareward.report.iteration_diagnostics` compares
fingerprints), which takes a few manifest reads; computing them takes a few seconds.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from metareward.config import IterationConfig
from metareward.report import SECTIONS, IterationReport, data_uri, iteration_diagnostics, iteration_markdown, write_run_report
from metareward.storage import StorageConfig, Store, slug
from tasks.reporting import artifact_key
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault


def run_artifact_key(run: str, kind: str | None = None) -> str:
    """The stable Prefect artifact key of the run's report: `{run}-report` or `{run}-report-{kind}`."""
    raw = f"{run}-report" + (f"-{kind}" if kind else "")
    return slug(raw)


def _value(value: Any) -> Any:
    """A table cell: NA and NaN as null, numpy scalars as Python values."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def publish_iteration_report(config: IterationConfig, report: IterationReport) -> None:
    """The iteration's markdown (plots inlined) and metric table artifacts."""
    create_markdown_artifact(
        iteration_markdown(report, image=lambda name: data_uri(report.plots[name])),
        key=artifact_key(config, "diagnostics", "summary"),
        description=f"Iteration {config.iteration}: diagnostics (score inflation, lengths, meta-judge biases, training)",
    )
    row = report.metrics.iloc[0]
    create_table_artifact(
        [{"metric": str(name), "value": _value(row[name])} for name in report.metrics.columns],
        key=artifact_key(config, "diagnostics", "rows"),
        description=f"Iteration {config.iteration}: every diagnostic metric ({report.uri})",
    )


@task(
    name="report",
    task_run_name="report-iter-{config.iteration}",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_on_transient_fault,
    **RETRY_OPTIONS,
)
def report(storage: StorageConfig, config: IterationConfig) -> str:
    """The iteration's diagnostics (computed, or reused while up to date) published to the UI;
    returns the URI of the `diagnostics` artifact."""
    result = iteration_diagnostics(Store(storage), config.run, config.iteration)
    publish_iteration_report(config, result)
    get_run_logger().info("diagnostics of iteration %d: %s", config.iteration, result.uri)
    return result.uri


@task(name="run-report", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def run_report(storage: StorageConfig, run: str) -> str:
    """Write the run's report page (`metareward.report.write_run_report`) and publish it; returns its URI."""
    page = write_run_report(Store(storage), run)
    create_markdown_artifact(
        page.markdown_with_embedded_plots(),
        key=run_artifact_key(run),
        description=f"Run {run}: diagnostics across iterations ({page.uri})",
    )
    shown = ["iteration", *(name for names in SECTIONS.values() for name in names)]
    create_table_artifact(
        [{name: _value(row[name]) for name in shown if name in page.table} for _, row in page.table.iterrows()],
        key=run_artifact_key(run, "rows"),
        description=f"Run {run}: diagnostics, one row per iteration",
    )
    get_run_logger().info("report of run %s: %s", run, page.uri)
    return page.uri

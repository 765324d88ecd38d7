"""What a person sees of a stage: Prefect artifacts, run logs and terminal progress.

Per stage and iteration, under stable keys (so the Prefect UI shows their history across runs):

    {run}-iter-{i}-{stage}-rows       table: the first rows of the stage's main artifact, long texts cut
    {run}-iter-{i}-{stage}-summary    markdown: the counts, what was dropped and why
    {run}-iter-{i}-{stage}-link       link: the stage's Parquet file (local path or s3:// URI)
    {run}-iter-{i}-{stage}-progress   progress 0-100, updated after each shard (generate, judge,
                                      meta-judge) and around training

Keys are lowercased, with every character other than a-z, 0-9 and '-' turned into '-' (Prefect's
rule). Terminal progress: a command line front end registers a listener with
`add_progress_listener`; it is called with (stage label, fraction) from the task's progress
callback, in the process that runs the flow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from metareward.config import IterationConfig
from metareward.stages import StageResult, TrainResult
from metareward.storage import DATA_FILE, Store, read_artifact, slug

PREVIEW_ROWS = 20
PREVIEW_TEXT_CHARS = 240

ProgressListener = Callable[[str, float], None]
_listeners: list[ProgressListener] = []


def artifact_key(config: IterationConfig, stage: str, kind: str) -> str:
    """The stable Prefect artifact key of one view of a stage: `{run}-iter-{i}-{stage}-{kind}`."""
    raw = f"{config.run}-iter-{config.iteration}-{stage}-{kind}"
    return slug(raw)


def add_progress_listener(listener: ProgressListener) -> None:
    """Call `listener(stage label, fraction in [0, 1])` whenever a stage in this process reports progress."""
    _listeners.append(listener)


def remove_progress_listener(listener: ProgressListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def stage_label(config: IterationConfig, stage: str) -> str:
    return f"iter {config.iteration} {stage}"


@contextmanager
def stage_progress(config: IterationConfig, stage: str) -> Iterator[Callable[[float], None]]:
    """A progress callback for a stage function: it updates the stage's progress artifact, logs each
    step, and tells the terminal listeners. The artifact ends at 100 when the stage returns."""
    logger = get_run_logger()
    label = stage_label(config, stage)
    artifact_id = create_progress_artifact(
        0.0,
        key=artifact_key(config, stage, "progress"),
        description=f"Iteration {config.iteration}, {stage}: share of shards done",
    )
    last = {"percent": -1.0}

    def report(fraction: float) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        for listener in list(_listeners):
            listener(label, percent / 100.0)
        if percent == last["percent"]:
            return
        last["percent"] = percent
        update_progress_artifact(artifact_id, percent)
        logger.info("%s: %.0f%% done", label, percent)

    yield report
    report(1.0)


def _cell(value: Any) -> Any:
    """A table cell the UI shows well: long texts cut, arrays and dicts as short text, NaN as null."""
    if isinstance(value, str):
        return value if len(value) <= PREVIEW_TEXT_CHARS else value[: PREVIEW_TEXT_CHARS - 1] + "…"
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "tolist"):
        value = value.tolist() if hasattr(value, "tolist") else value
        if not isinstance(value, (list, tuple, dict)):
            return value
        return _cell(json.dumps(value, default=str))
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def preview_rows(table: pd.DataFrame, rows: int = PREVIEW_ROWS) -> list[dict[str, Any]]:
    """The first `rows` rows as records for a table artifact (long texts cut)."""
    head = table.head(rows)
    return [{str(column): _cell(value) for column, value in record.items()} for record in head.to_dict(orient="records")]


def _flatten(summary: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in summary.items():
        label = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, prefix=f"{label}."))
        else:
            items.append((label, value))
    return items


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")


def summary_markdown(config: IterationConfig, result: StageResult) -> str:
    """The markdown summary of a stage: counts first, then what was dropped and why, then where."""
    summary = result.summary.model_dump(mode="json")
    dropped = summary.pop("dropped", None)
    lines = [f"# Iteration {config.iteration}: {result.stage}", ""]
    message = summary.pop("message", None)
    if message:
        lines += [f"**{message}**", ""]
    lines += ["| what | value |", "|---|---|"]
    lines += [f"| {name} | {_shown(value)} |" for name, value in _flatten(summary)]
    lines += ["", "## Dropped", ""]
    if isinstance(dropped, dict) and any(dropped.values()):
        lines += ["| reason | count |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(dropped.items())]
    else:
        lines.append("Nothing was dropped.")
    if result.uris:
        lines += ["", "## Artifacts", ""]
        lines += [f"- `{name}`: `{uri}`" for name, uri in sorted(result.uris.items())]
    if isinstance(result, TrainResult) and result.model is not None:
        lines += ["", f"New checkpoint: `{result.model.uri}` (sha256 `{result.model.sha256}`)"]
    return "\n".join(lines) + "\n"


def _link(uri: str) -> str:
    return f"file://{uri}" if uri.startswith("/") else uri


def publish_stage(store: Store, config: IterationConfig, result: StageResult) -> None:
    """Create the stage's table, markdown and link artifacts (see the module docstring)."""
    stage = result.stage
    create_markdown_artifact(
        summary_markdown(config, result),
        key=artifact_key(config, stage, "summary"),
        description=f"Iteration {config.iteration}, {stage}: counts and drops",
    )
    if result.uri is None:
        return
    table = read_artifact(store, result.uri)
    create_table_artifact(
        preview_rows(table),
        key=artifact_key(config, stage, "rows"),
        description=f"Iteration {config.iteration}, {stage}: first {min(PREVIEW_ROWS, len(table))} of {len(table)} rows of {result.uri}",
    )
    create_link_artifact(
        _link(store.join(result.uri, DATA_FILE)),
        link_text=f"{stage} ({len(table)} rows)",
        key=artifact_key(config, stage, "link"),
        description=f"Iteration {config.iteration}, {stage}: the Parquet table",
    )

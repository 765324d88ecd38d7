"""The commands that measure a run: `evaluate` (win rate of M_i against M_{i-1}, judge accuracy)
and `report` (diagnostics across iterations)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from metareward.cli.application import (
    _PREFECT_DEFAULTS,
    _lease_error,
    _load,
    _number,
    _prepare_prefect,
    _store_and_run,
    _writer_lease,
    app,
    console,
    print_error,
)


@app.command()
def evaluate(
    run_or_config: Annotated[str, typer.Argument(metavar="CONFIG", help="The run's YAML config (the evaluation needs its prompts, seed and engine).")],
    iteration: Annotated[
        Optional[int], typer.Option("--iteration", min=1, help="The iteration whose M_i is evaluated against M_{i-1} (default: the newest trained).")
    ] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Compute again what storage already holds for the same inputs.")] = False,
) -> None:
    """Win rate and length-controlled win rate of M_i against M_{i-1} on the held-out prompts, and both models' judge accuracy."""
    path = Path(run_or_config)
    if not path.is_file():
        print_error(f"{run_or_config}: not a config file; `evaluate` needs the run's config (its prompts, seed and engine)")
        raise typer.Exit(2)
    config = _load(path, inputs=True, evaluation=True)
    with _writer_lease(config):  # the results go into the run's folder
        _prepare_prefect()
        from flows.evaluate import evaluate_flow
        from metareward.evaluation import evaluation_markdown

        try:
            outcome = evaluate_flow(config, iteration=iteration, refresh=refresh)
        except Exception as error:  # the flow's logs hold the traceback; say what failed plainly
            _lease_error(config, error)
            print_error(f"evaluation of {config.name} failed: {type(error).__name__}: {error}")
            raise typer.Exit(1) from None
    console.print(evaluation_markdown(config.name, outcome.models.iteration, outcome.win_rate, outcome.judge_accuracy), markup=False)


@app.command()
def report(
    run_or_config: Annotated[str, typer.Argument(metavar="RUN", help="A run's config file, or its name.")],
    root: Annotated[str, typer.Option(help="Storage root when RUN is a name (a folder or s3://bucket/prefix).")] = "./runs",
    publish: Annotated[
        Optional[bool],
        typer.Option(
            "--publish/--no-publish",
            help="Publish the page as a Prefect artifact (default: when a Prefect API URL is set; --publish without one starts a temporary API).",
        ),
    ] = None,
) -> None:
    """Diagnostics of every complete iteration of RUN on one page with trend plots: {run}/report/report.md in the run's store."""
    store, run_name = _store_and_run(run_or_config, root)
    if publish is None:
        for name, value in _PREFECT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from prefect.settings import get_current_settings

        publish = bool(get_current_settings().api.url)
    try:
        if publish:
            _prepare_prefect()
            from flows.report import report_flow

            uri = report_flow(store.config, run_name)
        else:
            from metareward.report import write_run_report

            uri = write_run_report(store, run_name).uri
    except Exception as error:  # a run without complete iterations, storage, the Prefect API: say what failed plainly
        print_error(f"report of {run_name} failed: {type(error).__name__}: {error}")
        raise typer.Exit(1) from None
    from metareward.report import run_diagnostics

    reports, skipped = run_diagnostics(store, run_name)  # stored now: read back, not computed again
    table = Table(title=f"run {run_name}: diagnostics (docs/diagnostics.md)")
    columns = {
        "iter": "iteration", "score": "judge_score_mean", "top share": "judge_top_score_share", "all same": "judge_all_same_share",
        "chars": "actor_chars_mean", "chosen": "actor_chosen_chars_mean", "rejected": "actor_rejected_chars_mean",
        "pos bias": "meta_position_bias", "score bias": "meta_score_bias", "len bias": "meta_length_bias",
        "actor pairs": "actor_pairs", "judge pairs": "judge_pairs", "loss": "train_final_loss",
    }
    for column in columns:
        table.add_column(column, justify="right")
    for result in reports:
        row = result.metrics.iloc[0]
        table.add_row(*(_metric(row[name]) for name in columns.values()))
    console.print(table)
    for iteration, why in skipped.items():
        console.print(f"iteration {iteration}: {why}")
    console.print(f"Report: {uri}" + ("" if publish else " (not published to Prefect; --publish publishes it)"))


def _metric(value: Any) -> str:
    """A diagnostics cell: null as '-', numpy scalars as Python numbers."""
    import pandas as pd

    if pd.isna(value):
        return "-"
    return _number(value.item() if hasattr(value, "item") else value)

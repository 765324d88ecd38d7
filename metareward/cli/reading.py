"""The commands that read what storage holds of a run: `status` and `show`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from metareward.cli.application import _number, _print_status, _store_and_run, app, console


@app.command()
def status(
    run_or_config: Annotated[str, typer.Argument(metavar="RUN", help="A run's config file, or its name.")],
    root: Annotated[str, typer.Option(help="Storage root when RUN is a name (a folder or s3://bucket/prefix).")] = "./runs",
) -> None:
    """One line per iteration of RUN: state, checkpoint, counts and key metrics."""
    store, run_name = _store_and_run(run_or_config, root)
    if not _print_status(store, run_name):
        raise typer.Exit(1)


@app.command()
def show(
    run_or_config: Annotated[str, typer.Argument(metavar="RUN", help="A run's config file, or its name.")],
    root: Annotated[str, typer.Option(help="Storage root when RUN is a name (a folder or s3://bucket/prefix).")] = "./runs",
) -> None:
    """The status table, then every stage of every complete iteration: artifact counts and what was dropped."""
    store, run_name = _store_and_run(run_or_config, root)
    history = _print_status(store, run_name)
    if not history:
        raise typer.Exit(1)
    for record in history:
        if not record.complete:
            continue
        table = Table(title=f"iteration {record.iteration}")
        table.add_column("stage")
        table.add_column("counts")
        table.add_column("dropped")
        for stage, typed in record.stages:
            if typed is None:
                continue
            summary = typed.model_dump(mode="json")
            counts = {name: value for name, value in summary.items() if not isinstance(value, (dict, list)) and name != "message"}
            named = {name: value for name, value in summary.items() if isinstance(value, list) and value}  # the checks by result
            dropped = summary.get("dropped") or {}
            table.add_row(
                stage,
                ", ".join([*(f"{name} {_number(value)}" for name, value in counts.items()), *(f"{name}: {' '.join(value)}" for name, value in named.items())]),
                ", ".join(f"{reason} {count}" for reason, count in dropped.items() if count) or "-",
            )
        console.print(table)
    from metareward.report import report_uri

    page = report_uri(store, run_name)
    state = "brings it up to date" if store.exists(page) else "writes it (not written yet)"
    console.print(
        f"Diagnostics across iterations (score inflation, length growth, meta-judge biases): {page}; "
        f"`metareward report {run_or_config}` {state}"
    )

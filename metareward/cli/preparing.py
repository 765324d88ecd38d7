"""The commands for before a run: `seed` (the embedded seed model's ModelRef) and `plan` (expected
tokens and hours per iteration, to size a cluster before renting it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from metareward.cli.application import _load, app, console, print_error, print_warning


@app.command()
def seed() -> None:
    """Print the embedded seed model's ModelRef (converting the packaged GGUF once, about a minute)."""
    from metareward.checkpoints import seed_model

    typer.echo(json.dumps(seed_model().model_dump(), indent=2))


@app.command()
def plan(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The run's YAML config (e.g. configs/paper-llama3-8b.yaml).")],
    tokens_per_second: Annotated[
        Optional[float],
        typer.Option(help="Generated tokens per second of ONE engine (one GPU, or gpus_per_engine GPUs) for this model, as you measured it; without it no hours are shown."),
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs of the cluster; engines = GPUs // execution.ray.gpus_per_engine (one engine with backend local).")] = 1,
    prefill_speedup: Annotated[
        Optional[float],
        typer.Option(help="How many prompt (prefill) tokens cost as much as one generated token [default 10: metareward.planning.DEFAULT_PREFILL_SPEEDUP]."),
    ] = None,
    train_tokens_per_second: Annotated[
        Optional[float], typer.Option(help="Tokens per second of the whole DPO step (all its processes); without it DPO is left out of the hours.")
    ] = None,
    from_run: Annotated[
        bool, typer.Option("--from-run/--no-from-run", help="Take mean text lengths from the run's newest complete iteration in storage when it has one.")
    ] = True,
) -> None:
    """Expected counts, tokens and hours of each iteration of CONFIG: size a cluster before renting it (docs/scaling.md)."""
    config = _load(config_path)
    from metareward.planning import DEFAULT_PREFILL_SPEEDUP, PlanError, measured_lengths, plan_run
    from metareward.planning import hours_text as _hours, tokens_text as _tokens
    from metareward.storage import StorageError, Store

    measured = {}
    if from_run:
        store = Store(config.storage)
        try:
            measured = measured_lengths(store, config.name)
        except (StorageError, OSError) as error:
            print_error(f"cannot read run {config.name} in {store.root}: {error}; --no-from-run plans from assumed lengths")
            raise typer.Exit(1) from None
    try:
        run_plan = plan_run(
            config,
            gpus=gpus,
            tokens_per_second=tokens_per_second,
            prefill_speedup=DEFAULT_PREFILL_SPEEDUP if prefill_speedup is None else prefill_speedup,
            train_tokens_per_second=train_tokens_per_second,
            measured=measured,
        )
    except PlanError as error:
        print_error(str(error))
        raise typer.Exit(2) from None

    roles = ("actor", "judge", "meta_judge")
    work = Table(title=f"run {run_plan.run}: work per iteration (upper bounds: duplicates and invalid judgments make it less)")
    for column in ("iter", "prompts", "responses", "judgments", "meta comparisons", "generated actor", "generated judge",
                   "generated meta", "generated", "prefill actor", "prefill judge", "prefill meta", "prefill"):
        work.add_column(column, justify="right")
    for item in run_plan.iterations:
        work.add_row(
            str(item.iteration), f"{item.prompts:,}", f"{item.responses:,}", f"{item.judgments:,}", f"{item.meta_comparisons:,}",
            *(_tokens(item.generated_tokens[role]) for role in roles), _tokens(sum(item.generated_tokens.values())),
            *(_tokens(item.prefill_tokens[role]) for role in roles), _tokens(sum(item.prefill_tokens.values())),
        )
    work.add_row(
        "total", *(f"{run_plan.total(name):,.0f}" for name in ("prompts", "responses", "judgments", "meta_comparisons")),
        *(_tokens(sum(item.generated_tokens[role] for item in run_plan.iterations)) for role in roles), _tokens(run_plan.total_tokens("generated_tokens")),
        *(_tokens(sum(item.prefill_tokens[role] for item in run_plan.iterations)) for role in roles), _tokens(run_plan.total_tokens("prefill_tokens")),
    )
    console.print(work)

    time = Table(title=f"hours per iteration on {run_plan.gpus} GPU(s): {run_plan.engines} engine(s) of {run_plan.gpus_per_engine:g} GPU(s)")
    for column in ("iter", "shards", "waves", "hours actor", "hours judge", "hours meta", "hours generation",
                   "DPO pairs", "DPO tokens", "hours DPO", "hours"):
        time.add_column(column, justify="right")
    for item in run_plan.iterations:
        stage = item.stage_hours or {}
        time.add_row(
            str(item.iteration), f"{item.shards:,}", str(item.waves), *(_hours(stage.get(role)) for role in roles),
            _hours(item.generation_hours), f"{item.actor_pairs + item.judge_pairs:,}", _tokens(item.train_tokens),
            _hours(item.train_hours), _hours(item.hours),
        )
    totals = {name: None if run_plan.tokens_per_second is None else sum(getattr(item, name) for item in run_plan.iterations)
              for name in ("generation_hours", "hours")}
    train_total = None if run_plan.train_tokens_per_second is None else run_plan.total("train_hours")
    stage_totals = [None if run_plan.tokens_per_second is None else sum(item.stage_hours[role] for item in run_plan.iterations) for role in roles]
    time.add_row(
        "total", f"{run_plan.total('shards'):,.0f}", f"{run_plan.total('waves'):,.0f}", *(_hours(value) for value in stage_totals), _hours(totals["generation_hours"]),
        f"{run_plan.total('actor_pairs') + run_plan.total('judge_pairs'):,.0f}", _tokens(run_plan.total("train_tokens")),
        _hours(train_total), _hours(totals["hours"]),
    )
    console.print(time)

    lengths = Table(title="mean lengths used (tokens)")
    for column in ("text", "iterations", "tokens", "source"):
        lengths.add_column(column, justify="left" if column in ("text", "source") else "right")
    for kind in ("prompt", *roles):
        seen: dict[tuple[float, str], list[int]] = {}
        for item in run_plan.iterations:
            length = item.lengths[kind]
            seen.setdefault((length.tokens, length.source), []).append(item.iteration)
        for (tokens, source), iterations in seen.items():
            lengths.add_row(kind, ", ".join(map(str, iterations)), f"{tokens:,.1f}", source)
    console.print(lengths)

    if run_plan.tokens_per_second is None:
        console.print("No hours: give --tokens-per-second, one engine's measured generation throughput for this model.")
    else:
        console.print(
            f"Hours of a stage = (generated + prefill / {run_plan.prefill_speedup:g}) / shards x waves / {run_plan.tokens_per_second:,g} tokens/s / 3600; "
            f"waves = ceil(shards / {run_plan.engines} engine(s)). Engine loading and forced verdicts are not counted."
        )
    if run_plan.train_tokens_per_second is None:
        console.print("DPO is not in the hours: give --train-tokens-per-second, the measured throughput of the DPO step.")
    for note in run_plan.notes:
        print_warning(note)
    for item in run_plan.iterations:
        if item.shard_advice:
            print_warning(f"iteration {item.iteration}: {item.shard_advice}")

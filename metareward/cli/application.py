"""The `metareward` command.

    metareward run CONFIG [--refresh]              iterations of a run, resuming after the last complete one
    metareward iterate CONFIG [--iteration I]      exactly one more iteration (or iteration I again)
    metareward status RUN [--root ROOT]            one line per iteration: checkpoint, counts, metrics
    metareward show RUN [--root ROOT]              status, then every stage of every iteration
    metareward report RUN [--root ROOT]            diagnostics across iterations: {run}/report/report.md (+ Prefect artifact)
    metareward evaluate CONFIG [--iteration I]     win rate of M_i vs M_{i-1} on held-out prompts, judge accuracy
    metareward seed                                the embedded seed model's ModelRef (converted once)
    metareward plan CONFIG [--tokens-per-second X] [--gpus N]   expected tokens and hours per iteration, before renting GPUs

RUN is a run's config file or its name (then `--root`, default `./runs`, says where it is stored).

Prefect: with `PREFECT_API_URL` set, flow runs are recorded by that server (e.g. `prefect server
start`, whose UI then shows them). Without it, Prefect starts a temporary local server for the
command (its start-up takes 15-30 s on 2 cores) that records into the same local database the UI
of `prefect server start` reads (`~/.prefect/prefect.db`), so finished runs can be browsed later.
Long stages (generate, judge, meta-judge, train) show progress bars in the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="metareward",
    help="Meta-Rewarding (Wu et al. 2024) as Prefect flows: actor, judge and meta-judge in one model, trained with DPO.",
    no_args_is_help=True,
    add_completion=False,
)
# A pipe or a log file gets wide lines rather than tables cut to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)

# Prefect reads its settings from the environment when it is imported, so these defaults are set
# first (a value the user set wins). The temporary server needs more than the default 20 s to
# start on a busy 2-core machine, the stage modules' own log lines belong in the run logs, and
# a machine without internet should not try to send Prefect's anonymous telemetry. `iterate
# --iteration 1` resolves M0 with the run flow's tasks outside any flow: their log lines stay in
# the terminal instead of a warning that the API takes only flow runs' logs.
_PREFECT_DEFAULTS = {
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "metareward",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _prepare_prefect() -> None:
    for name, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url  # from the environment or the active Prefect profile
    if api_url:
        console.print(f"Prefect API: {api_url}")
    else:
        console.print(
            "No PREFECT_API_URL set: Prefect starts a temporary local API for this command (15-30 s). "
            "Its records stay in the local Prefect database: `prefect server start` shows them in the UI afterwards."
        )


def _check_execution(config) -> None:
    """A Ray set-up that cannot work, refused before Prefect starts anything (a temporary API
    included): the same check the flows make first, reported as a config error."""
    from flows.generation import check_execution
    from metareward.execution import ExecutionError

    try:
        check_execution(config)
    except ExecutionError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def _check_stored_version(config, refresh: bool) -> None:
    """A run stored by another pipeline version, refused before Prefect starts unless `--refresh`."""
    from metareward.runs import StoredRunVersionError, check_stored_version
    from metareward.storage import Store

    if refresh:
        return
    try:
        check_stored_version(Store(config.storage), config.name)
    except StoredRunVersionError as error:
        console.print(str(error), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _writer_lease(config):
    """The run's writer lease (`metareward.lease`), taken before Prefect starts and held until the
    command ends; the flows use this one. Another writer: its holder named, exit 2, nothing done."""
    from metareward.lease import RunLeaseHeld, RunLeaseLost, hold_run_lease

    try:
        with ExitStack() as stack:
            try:
                stack.enter_context(hold_run_lease(config.storage, config.name))
            except RunLeaseHeld as error:
                console.print(str(error), style="red", markup=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except (OSError, ValueError, RuntimeError) as error:  # the store cannot be reached or written
                console.print(f"cannot take the writer lease of run {config.name}: {error}", style="red", markup=False, soft_wrap=True)
                raise typer.Exit(1) from None
            yield
    except RunLeaseLost as error:  # the work ended, but another writer had taken the run over meanwhile
        console.print(f"run {config.name}: {error}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _lease_error(config, error: Exception) -> None:
    """A lease refusal or loss that reached the flow's caller: its one message, exit 2 or 1."""
    from metareward.lease import RunLeaseHeld, RunLeaseLost

    if isinstance(error, (RunLeaseHeld, RunLeaseLost)):
        console.print(f"run {config.name}: {error}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(error, RunLeaseHeld) else 1) from None


def _load(config_path: Path, inputs: bool = False, evaluation: bool | None = None):
    from metareward.config import ConfigError, load_config
    from metareward.inputs import check_inputs

    try:
        config = load_config(config_path)
        notes = check_inputs(config, evaluation, source=str(config_path)) if inputs else []  # files read before Prefect starts
    except ConfigError as error:  # markup off: a quoted prompt may hold [brackets]; soft_wrap: one unbroken line
        console.print(str(error), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for note in notes:
        console.print(note, style="yellow", markup=False, soft_wrap=True)
    return config


class _TerminalProgress:
    """Progress bars for the stages that report progress, fed by `tasks.reporting` listeners."""

    def __init__(self):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
        )
        self.bars: dict[str, Any] = {}

    def __call__(self, label: str, fraction: float) -> None:
        if label not in self.bars:
            self.bars[label] = self.progress.add_task(label, total=100)
        self.progress.update(self.bars[label], completed=100 * fraction)

    def __enter__(self):
        from tasks.reporting import add_progress_listener

        self.progress.start()
        add_progress_listener(self)
        return self

    def __exit__(self, *exc_info):
        from tasks.reporting import remove_progress_listener

        remove_progress_listener(self)
        self.progress.stop()


def _run_flow(config, refresh: bool, max_new_iterations: int | None, start_iteration: int | None = None):
    from flows.run import run_flow

    try:
        with _TerminalProgress():
            return run_flow(config, refresh=refresh, max_new_iterations=max_new_iterations, start_iteration=start_iteration)
    except Exception as error:  # the flow's logs above hold the traceback; say what failed plainly
        _lease_error(config, error)
        console.print(f"[red]run {config.name} failed: {type(error).__name__}: {error}[/red]")
        raise typer.Exit(1) from None


def _finish(config, outcome) -> None:
    from metareward.storage import Store

    console.print(f"\nRun [bold]{config.name}[/bold] stopped: {outcome.stopped}")
    console.print(f"Newest checkpoint: {outcome.model.uri} (sha256 {outcome.model.sha256[:16]}...)")
    _print_status(Store(config.storage), config.name)


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The run's YAML config (e.g. configs/demo.yaml).")],
    refresh: Annotated[bool, typer.Option("--refresh", help="Start again from M0 and run every stage again instead of taking its cached result.")] = False,
) -> None:
    """Run the iterations of CONFIG, resuming after the last complete iteration in storage, up to max_iterations."""
    config = _load(config_path, inputs=True)
    _check_stored_version(config, refresh)
    with _writer_lease(config):
        _prepare_prefect()
        _check_execution(config)
        _finish(config, _run_flow(config, refresh=refresh, max_new_iterations=None))


@app.command()
def iterate(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The run's YAML config.")],
    iteration: Annotated[
        Optional[int],
        typer.Option("--iteration", min=1, help="Run this iteration again (from the checkpoint of the one before) instead of the next one."),
    ] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Run every stage again instead of taking its cached result.")] = False,
) -> None:
    """Run exactly one more iteration of CONFIG (within max_iterations), or iteration I again with --iteration I."""
    config = _load(config_path, inputs=True)
    _check_stored_version(config, refresh)
    if iteration is not None:
        _check_base(config, iteration)
    with _writer_lease(config):
        _prepare_prefect()
        _check_execution(config)
        if iteration is None:
            _finish(config, _run_flow(config, refresh=refresh, max_new_iterations=1))
            return
        outcome = _run_flow(config, refresh=refresh, max_new_iterations=1, start_iteration=iteration)
    for ran in outcome.iterations:
        states = ", ".join(f"{stage} {state}" for stage, state in ran.states.items())
        console.print(f"\nIteration {ran.iteration}: {states}")
    _finish(config, outcome)


def _check_base(config, iteration: int) -> None:
    """Refuse, before Prefect starts, an iteration whose base checkpoint storage does not hold."""
    from metareward.runs import UnavailableBase, base_of_iteration, read_history
    from metareward.storage import Store

    if iteration > config.max_iterations:
        console.print(f"[red]--iteration {iteration} is past max_iterations ({config.max_iterations}) of run {config.name}[/red]")
        raise typer.Exit(2)
    store = Store(config.storage)
    try:
        base_of_iteration(read_history(store, config.name), iteration, config.name)
    except UnavailableBase as error:
        console.print(f"[red]{error} ({store.root})[/red]")
        raise typer.Exit(2) from None


def _store_and_run(run_or_config: str, root: str):
    from metareward.storage import StorageConfig, Store

    path = Path(run_or_config)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        config = _load(path)
        return Store(config.storage), config.name
    return Store(StorageConfig(root=root)), run_or_config


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _print_status(store, run: str) -> list:
    from metareward.runs import read_history

    history = read_history(store, run)
    if not history:
        console.print(f"No iterations of run {run!r} under {store.root}.")
        return history
    table = Table(title=f"run {run} ({store.run_uri(run)})")
    # Forced verdicts beside the valid ones, judge and meta-judge alike: a demo's are nearly all forced (README).
    for column in ("iter", "state", "checkpoint", "prompts", "responses", "judgments", "score", "forced",
                   "meta", "meta forced", "actor pairs", "judge pairs", "loss"):
        table.add_column(column, justify="left" if column in ("state", "checkpoint") else "right")
    for record in history:
        stages = record.stages
        judge, meta = stages.judge, stages.meta_judge
        if record.complete:
            state = "trained" if record.trained else "no pairs"
        else:
            state = "incomplete (" + ", ".join(record.artifacts) + ")" if record.artifacts else "started"
        table.add_row(
            str(record.iteration),
            state,
            (record.model.sha256[:12] + (" (pruned)" if record.pruned else "")) if record.model else "-",
            _number(stages.sample_prompts.prompts if stages.sample_prompts else None),
            _number(stages.generate.responses if stages.generate else None),
            _number(judge.judgments if judge else None),
            _number(judge.mean_score if judge else None),
            _number(judge.statuses.get("forced") if judge else None),
            _number(meta.meta_judgments if meta else None),
            _number(meta.statuses.get("forced") if meta else None),
            _number(stages.actor_pairs.pairs if stages.actor_pairs else None),
            _number(stages.judge_pairs.pairs) if stages.judge_pairs else ("not trained" if record.complete else "-"),
            _number(stages.train.final_loss if stages.train else None),
        )
    console.print(table)
    for record in history:
        if record.message:
            console.print(f"iteration {record.iteration}: {record.message}")
    return history


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
            dropped = summary.get("dropped") or {}
            table.add_row(
                stage,
                ", ".join(f"{name} {_number(value)}" for name, value in counts.items()),
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
        console.print(f"[red]{run_or_config}: not a config file; `evaluate` needs the run's config (its prompts, seed and engine)[/red]")
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
            console.print(f"[red]evaluation of {config.name} failed: {type(error).__name__}: {error}[/red]")
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
        console.print(f"[red]report of {run_name} failed: {type(error).__name__}: {error}[/red]")
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
            console.print(f"[red]cannot read run {config.name} in {store.root}: {error}; --no-from-run plans from assumed lengths[/red]")
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
        console.print(f"[red]{error}[/red]")
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
        console.print(f"[yellow]{note}[/yellow]")
    for item in run_plan.iterations:
        if item.shard_advice:
            console.print(f"[yellow]iteration {item.iteration}: {item.shard_advice}[/yellow]")


if __name__ == "__main__":
    app()

"""The commands that run a run's iterations as Prefect flows: `run` and `iterate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from metareward.cli.application import (
    _check_gates_answerable,
    _lease_error,
    _load,
    _prepare_prefect,
    _print_status,
    _writer_lease,
    app,
    console,
    print_error,
)


def _check_execution(config) -> None:
    """A Ray set-up that cannot work, refused before Prefect starts anything (a temporary API
    included): the same check the flows make first, reported as a config error."""
    from flows.generation import check_execution
    from metareward.execution import ExecutionError

    try:
        check_execution(config)
    except ExecutionError as error:
        print_error(str(error))
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
        print_error(str(error))
        raise typer.Exit(2) from None


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
        print_error(f"run {config.name} failed: {type(error).__name__}: {error}")
        raise typer.Exit(1) from None


def _finish(config, outcome) -> None:
    from metareward.storage import Store

    console.print(f"\nRun [bold]{config.name}[/bold] stopped: {outcome.stopped}")
    console.print(f"Promoted checkpoint (the next iteration's base): {outcome.model.uri} (sha256 {outcome.model.sha256[:16]}...)")
    _print_status(Store(config.storage), config.name)


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The run's YAML config (e.g. configs/demo.yaml).")],
    refresh: Annotated[bool, typer.Option("--refresh", help="Start again from M0 and run every stage again instead of taking its cached result.")] = False,
) -> None:
    """Run the iterations of CONFIG, resuming after the last complete iteration in storage, up to max_iterations."""
    config = _load(config_path, inputs=True)
    _check_stored_version(config, refresh)
    _check_gates_answerable(config)
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
    _check_gates_answerable(config)
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
        print_error(f"--iteration {iteration} is past max_iterations ({config.max_iterations}) of run {config.name}")
        raise typer.Exit(2)
    store = Store(config.storage)
    try:
        base_of_iteration(read_history(store, config.name), iteration, config.name)
    except UnavailableBase as error:
        print_error(f"{error} ({store.root})")
        raise typer.Exit(2) from None

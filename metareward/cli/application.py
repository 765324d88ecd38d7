"""The typer application of the `metareward` command, its console, the Prefect settings a command
starts Prefect with, and the helpers the command groups share (loading a config, finding a run,
the writer lease, the status table).

Prefect: with `PREFECT_API_URL` set, flow runs are recorded by that server (e.g. `prefect server
start`, whose UI then shows them). Without it, Prefect starts a temporary local server for the
command (its start-up takes 15-30 s on 2 cores) that records into the same local database the UI
of `prefect server start` reads (`~/.prefect/prefect.db`), so finished runs can be browsed later.
Long stages (generate, judge, meta-judge, train) show progress bars in the terminal.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

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


def print_error(message: str) -> None:
    """An error for the user, in red, as one unbroken line (a log or a test reads it whole), with
    markup off: a path, an exception or a quoted prompt may hold [brackets]."""
    console.print(message, style="red", markup=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """Advice the user should act on, in yellow, printed as `print_error` prints (a path or a
    quoted prompt in it may hold [brackets])."""
    console.print(message, style="yellow", markup=False, soft_wrap=True)


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


def configured_api_url() -> str | None:
    """The Prefect server's API a command reports to: `PREFECT_API_URL`, else the active profile's
    (None: Prefect would start a temporary API). Reads the settings only; starts no client."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def _check_gates_answerable(config) -> None:
    """A gate with policy `approve` waits for a person, who answers through the run's Prefect server
    (its UI or `metareward approve`). On the temporary API this command would start nobody could:
    refused with exit 2 before Prefect starts."""
    gates = ["pre_train"] if config.checks.pre_train.policy == "approve" else []
    if config.evaluation.at_end_of_iteration and config.checks.post_evaluation.policy == "approve":
        gates.append("post_evaluation")
    if gates and not configured_api_url():
        print_error(
            f"run {config.name}: checks.{gates[0]}.policy is approve, which waits for a person answering through the "
            "Prefect server, but no PREFECT_API_URL is set (Prefect would start a temporary API nobody can reach): "
            "start a server (`make serve`, or `prefect server start`) and set PREFECT_API_URL, or use policy warn or stop"
        )
        raise typer.Exit(2)


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
                print_error(str(error))
                raise typer.Exit(2) from None
            except (OSError, ValueError, RuntimeError) as error:  # the store cannot be reached or written
                print_error(f"cannot take the writer lease of run {config.name}: {error}")
                raise typer.Exit(1) from None
            yield
    except RunLeaseLost as error:  # the work ended, but another writer had taken the run over meanwhile
        print_error(f"run {config.name}: {error}")
        raise typer.Exit(1) from None


def _lease_error(config, error: Exception) -> None:
    """A lease refusal or loss that reached the flow's caller: its one message, exit 2 or 1."""
    from metareward.lease import RunLeaseHeld, RunLeaseLost

    if isinstance(error, (RunLeaseHeld, RunLeaseLost)):
        print_error(f"run {config.name}: {error}")
        raise typer.Exit(2 if isinstance(error, RunLeaseHeld) else 1) from None


def _load(config_path: Path, inputs: bool = False, evaluation: bool | None = None):
    from metareward.config import ConfigError, load_config
    from metareward.inputs import check_inputs

    try:
        config = load_config(config_path)
        notes = check_inputs(config, evaluation, source=str(config_path)) if inputs else []  # files read before Prefect starts
    except ConfigError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    for note in notes:
        print_warning(note)
    return config


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
    for column in ("iter", "state", "checkpoint", "promoted", "prompts", "responses", "judgments", "score", "forced",
                   "meta", "meta forced", "actor pairs", "judge pairs", "checks", "loss"):
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
            ("yes" if record.promoted else "no") if record.complete and record.trained else "-",
            _number(stages.sample_prompts.prompts if stages.sample_prompts else None),
            _number(stages.generate.responses if stages.generate else None),
            _number(judge.judgments if judge else None),
            _number(judge.mean_score if judge else None),
            _number(judge.statuses.get("forced") if judge else None),
            _number(meta.meta_judgments if meta else None),
            _number(meta.statuses.get("forced") if meta else None),
            _number(stages.actor_pairs.pairs if stages.actor_pairs else None),
            _number(stages.judge_pairs.pairs) if stages.judge_pairs else ("not trained" if record.complete else "-"),
            _checks(stages.pre_train_checks),
            _number(stages.train.final_loss if stages.train else None),
        )
    console.print(table)
    for record in history:
        if record.message:
            console.print(f"iteration {record.iteration}: {record.message}")
        if record.complete and record.trained and not record.promoted:
            console.print(f"iteration {record.iteration}: M{record.iteration} not promoted: {record.promotion_reason}")
    promoted = [record for record in history if record.complete and record.trained and record.promoted]
    if promoted:
        base = promoted[-1]
        console.print(f"promoted checkpoint: M{base.iteration} {base.model.uri} (sha256 {base.model.sha256[:12]})")
    return history


def _checks(summary) -> str:
    """The pre-train checks in one cell: `pass`, or how many failed and warned (names in `show`)."""
    if summary is None:
        return "-"
    counts = [f"{len(names)} {word}" for names, word in ((summary.failed, "fail"), (summary.warned, "warn")) if names]
    return ", ".join(counts) or "pass"

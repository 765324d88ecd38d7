"""The evaluation of a run as a Prefect flow: is M_i better than M_{i-1}, and is it a better judge?

    resolve models -> win rate (X vs Y on the held-out prompts, both orders) -> judge accuracy (X and Y)
                   -> markdown artifact `{run}-iter-{i}-evaluation-summary`

The logic lives in `metareward.evaluation` (docs/evaluation.md); the tasks only call it. By default X
is M_i of iteration `iteration` (the run's newest trained iteration when None), Y is the checkpoint
iteration i started from (M_{i-1}, or the last promoted checkpoint before it; M0 for iteration 1) and the judge is `evaluation.judge` (`seed`: M0). `model` / `baseline`
replace X / Y with any two checkpoints (a `ModelRef`, or a model string as in the config's `model`);
the results still go under iteration i's folder, `{root}/{run}/iter-{i}/evaluation/`. Artifacts
already in storage for the same inputs are reused unless `refresh`.

It runs on its own (`metareward evaluate CONFIG [--iteration i]`) and, with
`evaluation.at_end_of_iteration`, as a subflow at the end of each iteration that trained a model.
One model is loaded at a time (`metareward.evaluation.EngineSlot`); every engine is released at the end.
On a GPU machine the flow holds the GPUs' concurrency slots (`flows.concurrency`) while it works.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field

from flows.concurrency import gpu_slot_names, hold_slots
from flows.lease import flow_run_lease
from metareward import evaluation
from metareward.checkpoints import ModelRef, resolve_model
from metareward.checks import GateChecks
from metareward.config import RunConfig
from metareward.lease import RunLeaseHeld
from metareward.storage import Store
from tasks.reporting import artifact_key
from tasks.inputs import check_inputs_task
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault

_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retry_condition_fn": retry_on_transient_fault, **RETRY_OPTIONS}


class EvaluationModels(BaseModel):
    """Who is compared, and by whom: iteration i (where the results go), X, Y and the judge."""

    model_config = ConfigDict(extra="forbid")

    iteration: int = Field(ge=1)
    model_x: ModelRef
    model_y: ModelRef
    judge: ModelRef


class EvaluationOutcome(BaseModel):
    """What the evaluation flow returns: the models, the win-rate summary (`win_rate_summary` fields,
    models and URIs) and one judge-accuracy row per model (`judge_accuracy` fields)."""

    model_config = ConfigDict(extra="forbid")

    run: str
    models: EvaluationModels
    win_rate: dict[str, Any]
    judge_accuracy: list[dict[str, Any]]
    checks: GateChecks


def _resolve(spec: ModelRef | str, store: Store) -> ModelRef:
    if isinstance(spec, ModelRef):
        return spec
    return resolve_model(spec, fs=store.fs if store.protocol == "s3" and spec.startswith("s3://") else None)


@task(name="resolve-evaluation-models", **_TASK_OPTIONS)
def resolve_models(
    config: RunConfig, iteration: int | None, model: ModelRef | str | None, baseline: ModelRef | str | None
) -> EvaluationModels:
    """Iteration i, X (M_i unless `model`), Y (M_{i-1} unless `baseline`) and the judge from storage and the config."""
    from metareward.runs import read_history

    store = Store(config.storage)
    history = read_history(store, config.name)
    trained = {record.iteration: record.model for record in history if record.complete and record.trained}
    pruned = {record.iteration for record in history if record.pruned}

    def stored(i: int) -> ModelRef:
        if i in pruned:
            raise ValueError(
                f"the checkpoint of iteration {i} of run {config.name} was pruned (keep_last_checkpoints "
                f"{config.keep_last_checkpoints}); raise keep_last_checkpoints, or pass `model` / `baseline`"
            )
        return trained[i]

    if iteration is None:
        if not trained:
            raise ValueError(f"run {config.name} has no trained iteration in {store.run_uri(config.name)}: nothing to evaluate")
        iteration = max(trained)
    seed = _resolve(config.model, store)
    if model is None:
        if iteration not in trained:
            raise ValueError(
                f"iteration {iteration} of run {config.name} has no trained checkpoint in storage "
                f"(trained: {sorted(trained) or 'none'}); pass `model` to evaluate another checkpoint"
            )
        model = stored(iteration)
    if baseline is None:
        # The checkpoint iteration i started from: M_{i-1}, or the last promoted one before it.
        bases = {record.iteration: record.base for record in history if record.complete and record.base is not None}
        if iteration in bases:
            baseline = bases[iteration]
            of_run = [record.iteration for record in history if record.model is not None and record.model.sha256 == baseline.sha256]
            if of_run:
                baseline = stored(of_run[0])  # one of the run's checkpoints: refused when pruned
        elif iteration > 1 and iteration - 1 not in trained:
            raise ValueError(f"iteration {iteration - 1} of run {config.name} has no trained checkpoint in storage to compare with")
        else:
            baseline = seed if iteration == 1 else stored(iteration - 1)
    judge = seed if config.evaluation.judge == "seed" else _resolve(config.evaluation.judge, store)
    return EvaluationModels(iteration=iteration, model_x=_resolve(model, store), model_y=_resolve(baseline, store), judge=judge)


@task(name="win-rate", task_run_name="win-rate-iter-{models.iteration}", **_TASK_OPTIONS)
def win_rate(config: RunConfig, models: EvaluationModels, engines: evaluation.EngineSlot, refresh: bool) -> dict[str, Any]:
    """X against Y on the held-out prompts, each comparison in both orders, judged by the fixed judge."""
    result = evaluation.evaluate_win_rate(
        Store(config.storage), config, models.iteration, models.model_x, models.model_y, models.judge, engines, refresh
    )
    get_run_logger().info(
        "iteration %d: win rate %s (%s-%s), LC win rate %s (%s-%s) over %d decided comparisons (%s)",
        models.iteration,
        *(f"{result[name]:.3f}" if result[name] is not None else "-" for name in ("win_rate", "win_rate_low", "win_rate_high", "lc_win_rate", "lc_low", "lc_high")),
        result["decided"],
        result["statuses"],
    )
    return result


@task(name="judge-accuracy", task_run_name="judge-accuracy-iter-{models.iteration}", **_TASK_OPTIONS)
def judge_accuracy(config: RunConfig, models: EvaluationModels, engines: evaluation.EngineSlot, refresh: bool) -> list[dict[str, Any]]:
    """X and Y as rubric judges of the preference set (Y first: after the win rate it may still be loaded as the judge)."""
    roles = {evaluation.MODEL_Y: models.model_y, evaluation.MODEL_X: models.model_x}
    rows = evaluation.evaluate_judge_accuracy(Store(config.storage), config, models.iteration, roles, engines, refresh)
    for row in rows:
        get_run_logger().info("iteration %d: judge accuracy of %s (%s): %s", models.iteration, row["role"], row["model"], row["accuracy"])
    return rows


@task(name="post-evaluation-checks", task_run_name="post-evaluation-checks-iter-{iteration}", **_TASK_OPTIONS)
def post_evaluation_checks(
    config: RunConfig, iteration: int, win: dict[str, Any], accuracy: list[dict[str, Any]]
) -> GateChecks:
    """The checks on M_i after the evaluation (win rate, judge accuracy against M_{i-1}): a Parquet
    table beside the evaluation's and a table artifact in the UI, one row per check."""
    uri, key, results = evaluation.evaluate_checks(Store(config.storage), config, iteration, win, accuracy)
    create_table_artifact(
        [result.model_dump() for result in results],
        key=artifact_key(config.for_iteration(iteration), "post-evaluation-checks", "rows"),
        description=f"Iteration {iteration}: the post-evaluation checks of M_i ({uri})",
    )
    return GateChecks(gate="post_evaluation", uri=uri, key=key, results=results)


@flow(name="metareward-evaluate", flow_run_name="{config.name}-evaluate")
def evaluate_flow(
    config: RunConfig,
    iteration: int | None = None,
    model: ModelRef | str | None = None,
    baseline: ModelRef | str | None = None,
    refresh: bool = False,
) -> EvaluationOutcome:
    """Evaluate iteration `iteration` of the run `config` (None: its newest trained iteration): win rate
    and length-controlled win rate of `model` (default M_i) against `baseline` (default M_{i-1}) on
    the held-out prompts, and both models' judge accuracy on the preference set.

    It writes into the run's folder, so it holds the run's writer lease (`metareward.lease`; as a
    subflow of the run flow, the run's): another writer of the run makes it end Failed with
    `RunLeaseHeld` before a model loads."""
    check_inputs_task(config, evaluation=True)  # a bad file fails before a model loads
    try:
        with flow_run_lease(config.storage, config.name):
            return _evaluate(config, iteration, model, baseline, refresh)
    except RunLeaseHeld as error:
        return Failed(message=str(error), data=error)  # one line in the log and the UI, not a traceback


def _evaluate(
    config: RunConfig, iteration: int | None, model: ModelRef | str | None, baseline: ModelRef | str | None, refresh: bool
) -> EvaluationOutcome:
    """The body of `evaluate_flow`, run while it holds the run's lease."""
    models = resolve_models(config, iteration, model, baseline)
    engines = evaluation.EngineSlot(Store(config.storage))
    # Like an iteration's GPU stages, the evaluation holds every GPU it sees while it loads models.
    with hold_slots(gpu_slot_names(), f"evaluation of iteration {models.iteration}"):
        try:
            win = win_rate(config, models, engines, refresh)
            accuracy = judge_accuracy(config, models, engines, refresh)
        finally:
            engines.release()
    checks = post_evaluation_checks(config, models.iteration, win, accuracy)
    create_markdown_artifact(
        evaluation.evaluation_markdown(config.name, models.iteration, win, accuracy),
        key=artifact_key(config.for_iteration(models.iteration), "evaluation", "summary"),
        description=f"Iteration {models.iteration}: win rate, length-controlled win rate, judge accuracy",
    )
    return EvaluationOutcome(run=config.name, models=models, win_rate=win, judge_accuracy=accuracy, checks=checks)

"""One Meta-Rewarding iteration as a Prefect flow: iteration i turns M_{i-1} into M_i.

The flow is the list of its stages (one task each, `tasks.stages`):

    sample prompts -> generation subflow (generate -> judge -> [meta-judge]) -> actor pairs
        -> [judge pairs] -> train -> summary

then the `report` task (`tasks.report`): the iteration's diagnostics, written beside its artifacts
and shown in the UI; it is not a stage (not cached, not in the outcome's `states`).

Meta-judging and judge pairs run only in an iteration that trains judge pairs
(`pairs.train_judge_pairs`, per-iteration override). Every task is cached by checkpoint hash
(`tasks.cache`, keyed by the fingerprint of `metareward.contract`), with its cache record in the run's own store, so running a finished
iteration again loads no model and every stage ends `Cached`; `refresh=True` runs every stage
again, sharded stages included (their shards in storage are discarded), and overwrites its
record. Training releases the serving engines before DPO (in `metareward.stages.train`). On a GPU
machine the flow holds a concurrency slot of every GPU it sees from generate through train
(`flows.concurrency`), so two flows never share a GPU. The generation stages run in a subflow
(`flows.generation`): in this process, or over a Ray cluster with `execution.backend: ray`, whose
connection and workers end with the subflow, before training. With `evaluation.at_end_of_iteration` the
evaluation flow (`flows.evaluate`) runs last, as a subflow. An iteration without any pair trains
nothing: its outcome has no model and a message saying why.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.concurrency import gpu_slot_names, hold_slots
from flows.evaluate import evaluate_flow
from flows.generation import check_execution, ensure_workers_gone, generation_subflow
from metareward.checkpoints import ModelRef
from metareward.config import RunConfig
from metareward.stages import StageResult
from metareward.summaries import IterationSummary
from tasks.report import report
from tasks.stages import StageRuns, actor_pairs, judge_pairs, sample_prompts, summary, train


class IterationOutcome(BaseModel):
    """What an iteration flow returns.

    iteration: i. base_model: M_{i-1}. model: M_i, or None when the iteration had no pairs to
    train on (`message` says so). summary: the iteration's typed summary (what storage holds).
    stages: each stage's result, by stage name, in run order. states: each stage's final Prefect
    state name (`Completed`, or `Cached` when taken from the cache).
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    base_model: ModelRef
    model: ModelRef | None
    message: str | None = None
    summary: IterationSummary
    stages: dict[str, StageResult] = Field(default_factory=dict)
    states: dict[str, str] = Field(default_factory=dict)


@flow(name="metareward-iteration", flow_run_name="{config.name}-iter-{iteration}")
def iteration_flow(config: RunConfig, iteration: int, model: ModelRef, refresh: bool = False) -> IterationOutcome:
    """Iteration `iteration` of the run `config` (1 = M0 -> M1), starting from checkpoint `model` (M_{i-1})."""
    settings = config.for_iteration(iteration)
    storage = config.storage
    check_execution(config)
    runs = StageRuns(storage, settings.run, refresh)

    prompts = runs(sample_prompts, storage, settings)
    # The engines stay loaded from generate to train: the GPUs are this flow's for that whole span.
    with hold_slots(gpu_slot_names(), f"iteration {iteration} GPU stages"):
        # Prefect links what a subflow returns to its flow run one level deep, and a task given such an
        # object records a `flow_run` input, which Prefect 3.9's UI cannot list (the iteration's Task
        # Runs tab stays empty). A deep copy carries no link; the stages' fingerprints still chain them.
        generated = generation_subflow(config)(config, iteration, model, prompts, refresh).model_copy(deep=True)
        ensure_workers_gone(config, generated)
        runs.record(generated.results, generated.states)
        responses, judgments, meta_judgments = generated.responses, generated.judgments, generated.meta_judgments
        actor = runs(actor_pairs, storage, settings, prompts, responses, judgments)
        judge = None
        if meta_judgments is not None:
            judge = runs(judge_pairs, storage, settings, prompts, responses, judgments, meta_judgments)
        trained = runs(train, storage, settings, model, actor, judge)
    overview = runs(summary, storage, settings, model, list(runs.results.values()))
    report(storage, settings)  # diagnostics of what the iteration wrote (metareward.report), in storage and the UI
    if config.evaluation.at_end_of_iteration and trained.model is not None:
        evaluate_flow(config, iteration, trained.model, model, refresh)

    message = trained.summary.message
    logger = get_run_logger()
    if trained.model is None:
        logger.warning("iteration %d trained no model: %s", iteration, message)
    else:
        logger.info("iteration %d: M%d = %s (sha256 %s)", iteration, iteration, trained.model.uri, trained.model.sha256)
    return IterationOutcome(
        iteration=iteration,
        base_model=model,
        model=trained.model,
        message=message,
        summary=overview.summary,
        stages=runs.results,
        states=runs.states,
    )

"""One Meta-Rewarding iteration as a Prefect flow: iteration i turns M_{i-1} into M_i.

The flow is the list of its stages (one task each, `tasks.stages`):

    sample prompts -> generation subflow (generate -> judge -> [meta-judge]) -> actor pairs
        -> [judge pairs] -> pre-train checks -> pre-train gate -> train -> summary
        -> [evaluation -> post-evaluation gate] -> promotion

then the `report` task (`tasks.report`): the iteration's diagnostics, written beside its artifacts
and shown in the UI; it is not a stage (not cached, not in the outcome's `states`).

Meta-judging and judge pairs run only in an iteration that trains judge pairs
(`pairs.train_judge_pairs`, per-iteration override). Every task is cached by checkpoint hash
(`tasks.cache`, keyed by the fingerprint of `metareward.contract`), with its cache record in the run's own store, so running a finished
iteration again loads no model and every stage ends `Cached`; `refresh=True` runs every stage
again, sharded stages included (their shards in storage are discarded), and overwrites its
record. Training releases the serving engines before DPO (in `metareward.stages.train`). On a GPU
machine the flow holds a concurrency slot of every GPU it sees from generate through train
(`flows.concurrency`), so two flows never share a GPU; a gate that waits for a person releases the
engines and those slots first and takes the slots again before training. The generation stages run in a subflow
(`flows.generation`): in this process, or over a Ray cluster with `execution.backend: ray`, whose
connection and workers end with the subflow, before training. With `evaluation.at_end_of_iteration` the
evaluation flow (`flows.evaluate`) runs last, as a subflow. An iteration without any pair trains
nothing: its outcome has no model and a message saying why.

The gates (`flows.gates`, docs/diagnostics.md#checks) act on the judge-health checks: before
training (a rejection or `stop` ends the run) and, with the evaluation, on M_i: M_i is promoted
(the next iteration's base) when that gate passes or a person approves it. Without the evaluation
every trained M_i is promoted. The promotion record is the iteration's last write.
"""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.concurrency import gpu_slot_names, hold_slots
from flows.evaluate import evaluate_flow
from flows.gates import GateStopped, run_gate
from flows.generation import check_execution, ensure_workers_gone, generation_subflow
from metareward.checkpoints import ModelRef
from metareward.checks import GateChecks, read_results
from metareward.config import IterationConfig, RunConfig
from metareward.engines import release_engines
from metareward.gates import GateRecord, PromotionRecord, write_promotion
from metareward.stages import ChecksResult, StageResult
from metareward.storage import StorageConfig, Store, read_artifact
from metareward.summaries import IterationSummary
from tasks.report import report
from tasks.reporting import artifact_key
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault
from tasks.stages import (
    StageRuns,
    actor_pairs,
    judge_pairs,
    pre_train_checks,
    previous_iteration_summary,
    sample_prompts,
    summary,
    train,
)


class IterationOutcome(BaseModel):
    """What an iteration flow returns.

    iteration: i. base_model: the checkpoint it started from. model: M_i, or None when the
    iteration had no pairs to train on (`message` says so). promoted: M_i is the next iteration's
    base (`promotion_reason` says why or why not). summary: the iteration's typed summary (what storage holds).
    stages: each stage's result, by stage name, in run order. states: each stage's final Prefect
    state name (`Completed`, or `Cached` when taken from the cache).
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    base_model: ModelRef
    model: ModelRef | None
    promoted: bool = False
    promotion_reason: str = ""
    message: str | None = None
    summary: IterationSummary
    stages: dict[str, StageResult] = Field(default_factory=dict)
    states: dict[str, str] = Field(default_factory=dict)


@task(name="gate-checks", task_run_name="gate-checks-{result.stage}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def gate_checks(storage: StorageConfig, result: ChecksResult) -> GateChecks:
    """A checks stage's results, read from its table."""
    results = read_results(read_artifact(Store(storage), result.uri))
    return GateChecks(gate=result.summary.gate, uri=result.uri, key=result.key, results=results)


@task(name="record-promotion", task_run_name="record-promotion-iter-{record.iteration}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def record_promotion(storage: StorageConfig, config: IterationConfig, record: PromotionRecord) -> str:
    """The iteration's last write: whether M_i is the next iteration's base, and why (also a
    markdown artifact in the UI, `{run}-iter-{i}-promotion-summary`)."""
    uri = write_promotion(Store(storage), config.run, record)
    i = record.iteration
    model = f"`{record.model.uri}` (sha256 `{record.model.sha256[:16]}`)" if record.model else "none"
    next_base = record.model if record.promoted and record.model else record.base
    create_markdown_artifact(
        f"### Iteration {i}: M{i} {'promoted' if record.promoted else 'not promoted'}\n\n"
        f"- M{i}: {model}\n- why: {record.reason}\n- base of this iteration: `{record.base.uri}`\n"
        f"- the next iteration starts from: `{next_base.uri}` (sha256 `{next_base.sha256[:16]}`)\n",
        key=artifact_key(config, "promotion", "summary"),
        description=f"Iteration {i}: which checkpoint the next iteration starts from",
    )
    return uri


def _gate(config: RunConfig, iteration: int, checks: GateChecks, release=None) -> GateRecord:
    gate_config = getattr(config.checks, checks.gate)
    return run_gate(config.storage, config.name, iteration, checks.gate, checks.results, checks.key, gate_config, release)


@flow(name="metareward-iteration", flow_run_name="{config.name}-iter-{iteration}")
def iteration_flow(config: RunConfig, iteration: int, model: ModelRef, refresh: bool = False) -> IterationOutcome:
    """Iteration `iteration` of the run `config` (1 = M0 -> M1), starting from checkpoint `model`
    (M_{i-1}, or the last promoted checkpoint). Raises `GateStopped` when a gate stops the run."""
    settings = config.for_iteration(iteration)
    storage = config.storage
    check_execution(config)
    runs = StageRuns(storage, settings.run, refresh)

    prompts = runs(sample_prompts, storage, settings)
    # The engines stay loaded from generate to train: the GPUs are this flow's for that whole span,
    # unless the pre-train gate waits for a person (it releases both first).
    with ExitStack() as gpus:
        gpus.enter_context(hold_slots(gpu_slot_names(), f"iteration {iteration} GPU stages"))
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
        previous = previous_iteration_summary(storage, settings)
        checked = runs(pre_train_checks, storage, settings, responses, judgments, actor, meta_judgments, judge, previous)
        released = []

        def release() -> None:  # nothing waits holding a model in memory or the GPUs' slots
            release_engines()
            gpus.close()
            released.append(True)

        decision = _gate(config, iteration, gate_checks(storage, checked), release)
        if decision.decision == "rejected":
            raise GateStopped(f"pre_train gate of iteration {iteration}: rejected by {decision.by} ({decision.reason or 'no reason given'})")
        if released:
            gpus.enter_context(hold_slots(gpu_slot_names(), f"iteration {iteration} training"))
        trained = runs(train, storage, settings, model, actor, judge)
    overview = runs(summary, storage, settings, model, list(runs.results.values()))
    report(storage, settings)  # diagnostics of what the iteration wrote (metareward.report), in storage and the UI

    logger = get_run_logger()
    message = trained.summary.message
    if trained.model is None:
        logger.warning("iteration %d trained no model: %s", iteration, message)
        promoted, reason = False, f"no model trained: {message}"
    elif config.evaluation.at_end_of_iteration:
        evaluated = evaluate_flow(config, iteration, trained.model, model, refresh)
        decision = _gate(config, iteration, evaluated.checks.model_copy(deep=True))
        promoted = decision.decision in ("passed", "approved")
        reason = {
            "passed": "the post-evaluation checks passed",
            "approved": f"approved by {decision.by} ({decision.reason or 'no reason given'})",
            "rejected": f"rejected by {decision.by} ({decision.reason or 'no reason given'})",
            "warned": f"post-evaluation checks failed: {', '.join(decision.failed)} (policy warn: not promoted)",
        }[decision.decision]
    else:
        promoted, reason = True, "no post-evaluation gate (evaluation.at_end_of_iteration is off)"
    if trained.model is not None:
        logger.info(
            "iteration %d: M%d = %s (sha256 %s), %s: %s", iteration, iteration, trained.model.uri, trained.model.sha256,
            "promoted" if promoted else "not promoted", reason,
        )
    record_promotion(storage, settings, PromotionRecord(iteration=iteration, base=model, model=trained.model, promoted=promoted, reason=reason))
    return IterationOutcome(
        iteration=iteration,
        base_model=model,
        model=trained.model,
        promoted=promoted,
        promotion_reason=reason,
        message=message,
        summary=overview.summary,
        stages=runs.results,
        states=runs.states,
    )

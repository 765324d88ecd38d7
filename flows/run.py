"""A named Meta-Rewarding run as a Prefect flow: iterations 1, 2, ... from the seed model M0.

The run resumes after the last complete iteration it finds in storage (an iteration is complete
once its `summary` artifact is written, the last stage), starting from that iteration's checkpoint,
and stops after iteration `max_iterations`. It also stops, with the reason in the logs and in its
outcome, when an iteration had no preference pairs and so trained no model: a later iteration
would see the same model again. `refresh=True` starts again from M0 and runs every stage again instead of taking its cached result.

After each trained iteration, old checkpoints are pruned by `keep_last_checkpoints`
(`metareward.checkpoints.prune_checkpoints`); resuming needs only the newest, which is always kept.

`read_history` (a plain function, also behind `metareward status`) reads what storage holds of a run.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.concurrency import hold_slots, run_slot_name
from flows.generation import check_execution
from flows.iteration import IterationOutcome, iteration_flow
from metareward.checkpoints import (
    MANIFEST_NAME,
    CheckpointRetention,
    ModelRef,
    prune_checkpoints,
    publish_checkpoint,
    resolve_model,
)
from metareward.config import RunConfig
from metareward.stages import SUMMARY
from metareward.storage import StorageConfig, Store, is_complete, read_artifact
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault


class IterationRecord(BaseModel):
    """What storage holds of one iteration.

    complete: its summary artifact exists. trained: it produced a checkpoint (`model`).
    pruned: that checkpoint is no longer in storage (removed by `keep_last_checkpoints`, or by hand).
    stages: every stage's summary (counts, drops, metrics) from the summary artifact, by stage name.
    artifacts: the names of the artifacts present and complete under `iter-{i}/`.
    """

    model_config = ConfigDict(extra="forbid")

    iteration: int
    complete: bool
    trained: bool = False
    model: ModelRef | None = None
    pruned: bool = False
    message: str | None = None
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list)


def read_history(store: Store, run: str) -> list[IterationRecord]:
    """Every iteration folder of `run` in `store`, ascending, with what it holds."""
    records = []
    for iteration in store.list_iterations(run):
        folder = store.iteration_uri(run, iteration)
        artifacts = [
            uri.rsplit("/", 1)[-1] for uri in store.ls(folder) if is_complete(store, uri)
        ]
        summary_uri = store.stage_uri(run, iteration, SUMMARY)
        if not is_complete(store, summary_uri):
            records.append(IterationRecord(iteration=iteration, complete=False, artifacts=artifacts))
            continue
        table = read_artifact(store, summary_uri)
        stages = {str(row["stage"]): json.loads(row["summary"]) for _, row in table.iterrows()}
        trained = stages.get("train", {})
        model = None
        if trained.get("trained"):
            model = ModelRef(uri=trained["checkpoint"], sha256=trained["checkpoint_sha256"])
        records.append(
            IterationRecord(
                iteration=iteration,
                complete=True,
                trained=model is not None,
                model=model,
                pruned=model is not None and not store.exists(store.join(model.uri, MANIFEST_NAME)),
                message=trained.get("message"),
                stages=stages,
                artifacts=artifacts,
            )
        )
    return records


def completed_prefix(history: list[IterationRecord]) -> list[IterationRecord]:
    """The complete iterations 1, 2, ... without a gap, up to the first that trained no model
    (what a run resumes after)."""
    done = []
    for expected, record in enumerate(history, start=1):
        if record.iteration != expected or not record.complete:
            break
        done.append(record)
        if not record.trained:
            break
    return done


class RunOutcome(BaseModel):
    """What a run flow returns: the iterations it ran now, where it resumed, why it stopped, and
    the newest checkpoint of the run."""

    model_config = ConfigDict(extra="forbid")

    run: str
    resumed_after: int
    iterations: list[IterationOutcome] = Field(default_factory=list)
    stopped: str
    model: ModelRef


@task(name="read-history", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def read_history_task(storage: StorageConfig, run: str) -> list[IterationRecord]:
    """The run's iterations found in storage (retried like a stage on transient storage faults)."""
    return read_history(Store(storage), run)


@task(name="resolve-seed-model", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def resolve_seed_model(spec: str, storage: StorageConfig) -> ModelRef:
    """M0 from the config's `model` (`embedded`, a local folder, an s3:// checkpoint or a hub id)."""
    store = Store(storage)
    return resolve_model(spec, fs=store.fs if store.protocol == "s3" and spec.startswith("s3://") else None)


@task(name="publish-seed-model", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def publish_seed_model(model: ModelRef, storage: StorageConfig, run: str) -> ModelRef:
    """M0 copied to `{root}/{run}/seed` when it is a local folder and the stages run on a Ray
    cluster: the other machines read it from object storage, verified by its sha256."""
    store = Store(storage)
    return publish_checkpoint(model, store.join(store.run_uri(run), "seed"), fs=store.fs)


def run_seed_model(config: RunConfig) -> ModelRef:
    """M0 of the run, where its stages can read it: published to object storage when they run on
    a Ray cluster and the model is a local folder."""
    seed = resolve_seed_model(config.model, config.storage)
    if config.execution.backend == "ray" and config.execution.ray.is_cluster:
        seed = publish_seed_model(seed, config.storage, config.name)
    return seed


def _newest_checkpoint(config: RunConfig, done: list[IterationRecord]) -> ModelRef:
    """The checkpoint the run continues from: the last trained iteration's, else M0."""
    trained = [record for record in done if record.trained]
    return trained[-1].model if trained else run_seed_model(config)


@task(name="prune-checkpoints", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def prune_checkpoints_task(storage: StorageConfig, run: str, keep_last: int | None, newest: int) -> CheckpointRetention:
    """Old checkpoints of the run removed by the retention setting, keeping iteration `newest`'s."""
    retention = prune_checkpoints(Store(storage), run, keep_last, newest)
    if retention.pruned:
        get_run_logger().info(
            "pruned %d checkpoint(s) (keep_last_checkpoints %d): %s", len(retention.pruned), keep_last, ", ".join(retention.pruned)
        )
    return retention


@flow(name="metareward-run", flow_run_name="{config.name}")
def run_flow(
    config: RunConfig,
    refresh: bool = False,
    max_new_iterations: int | None = None,
    if_busy: Literal["wait", "skip"] = "wait",
) -> RunOutcome:
    """Run `config` from where storage says it stands up to `max_iterations` (at most
    `max_new_iterations` more when given); `refresh` starts from M0 and runs every stage again.

    Only one flow run works on a named run at a time (`flows.concurrency`): while another holds
    the run, `if_busy="wait"` waits for it and `"skip"` ends at once, changing nothing."""
    check_execution(config)  # a Ray setup that cannot work fails before the seed model is even converted
    with hold_slots([run_slot_name(config.name)], f"run {config.name}", wait=if_busy == "wait") as held:
        if held:
            return _continue_run(config, refresh, max_new_iterations)
        stopped = "skipped: another flow run is working on this run (its slot is held); nothing changed"
        get_run_logger().warning("run %s %s", config.name, stopped)
        done = completed_prefix(read_history_task(config.storage, config.name))
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=_newest_checkpoint(config, done))


def _continue_run(config: RunConfig, refresh: bool, max_new_iterations: int | None) -> RunOutcome:
    """The body of `run_flow`, run while it holds the run's slot."""
    logger = get_run_logger()
    done = [] if refresh else completed_prefix(read_history_task(config.storage, config.name))
    model = _newest_checkpoint(config, done)
    if done:
        logger.info("run %s: iterations 1-%d are complete in storage", config.name, len(done))
    if len(done) >= config.max_iterations and done[-1].trained:
        stopped = f"finished: iterations 1-{len(done)} of max_iterations {config.max_iterations} are complete; nothing to do"
        logger.info("run %s %s (newest checkpoint %s)", config.name, stopped, model.uri)
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=model)
    if done and not done[-1].trained:
        stopped = f"iteration {done[-1].iteration} trained no model, so the run cannot go on: {done[-1].message}"
        logger.warning(stopped)
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=model)

    start = len(done) + 1
    last = config.max_iterations
    if max_new_iterations is not None:
        last = min(last, start + max_new_iterations - 1)
    outcomes: list[IterationOutcome] = []
    stopped = None
    for iteration in range(start, last + 1):
        outcome = iteration_flow(config, iteration, model, refresh)
        outcomes.append(outcome)
        if outcome.model is None:
            stopped = f"iteration {iteration} trained no model, so the run stops: {outcome.message}"
            logger.warning(stopped)
            break
        model = outcome.model
        prune_checkpoints_task(config.storage, config.name, config.keep_last_checkpoints, iteration)
    if stopped is None:
        stopped = (
            f"reached max_iterations ({config.max_iterations})"
            if last >= config.max_iterations
            else f"ran the {max_new_iterations} iteration(s) asked for"
        )
    logger.info("run %s stopped: %s; newest checkpoint %s", config.name, stopped, model.uri)
    return RunOutcome(run=config.name, resumed_after=len(done), iterations=outcomes, stopped=stopped, model=model)

"""A named Meta-Rewarding run as a Prefect flow: iterations 1, 2, ... from the seed model M0.

The run resumes after the last complete iteration it finds in storage (an iteration is complete
once its promotion record is written, its last write), starting from the last promoted checkpoint
(`flows.iteration`: every trained M_i without the evaluation's gate), and stops after iteration
`max_iterations`, or after `checks.max_consecutive_rejections` iterations in a row whose M_i was not
promoted, or when a gate stops it (the flow run ends Failed with the gate's message). It also stops, with the reason in the logs and in its
outcome, when an iteration had no preference pairs and so trained no model: a later iteration
would see the same model again. `refresh=True` starts again from M0 and runs every stage again instead of taking its cached result.

After each trained iteration, old checkpoints are pruned by `keep_last_checkpoints`
(`metareward.checkpoints.prune_checkpoints`); the newest and the promoted base are always kept.

`read_history` (a plain function, also behind `metareward status`) reads what storage holds of a run.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field

from flows.concurrency import hold_slots, run_slot_name
from flows.gates import GateStopped
from flows.generation import check_execution
from flows.iteration import IterationOutcome, iteration_flow
from flows.lease import flow_run_lease
from metareward.checkpoints import (
    MANIFEST_NAME,
    CheckpointRetention,
    ModelRef,
    prune_checkpoints,
    publish_checkpoint,
    resolve_model,
)
from metareward.config import RunConfig
from metareward.lease import RunLeaseHeld, check_lease
from metareward.runs import (
    IterationRecord,
    base_of_iteration,
    check_stored_version,
    completed_prefix,
    promoted_base,
    read_history,
    trailing_rejections,
)
from metareward.storage import StorageConfig, Store
from tasks.inputs import check_inputs_task
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault


class RunOutcome(BaseModel):
    """What a run flow returns: the iterations it ran now, where it resumed, why it stopped, and
    the newest promoted checkpoint (the base of the run's next iteration)."""

    model_config = ConfigDict(extra="forbid")

    run: str
    resumed_after: int
    iterations: list[IterationOutcome] = Field(default_factory=list)
    stopped: str
    model: ModelRef


@task(name="read-history", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def read_history_task(storage: StorageConfig, run: str, check_version: bool = False) -> list[IterationRecord]:
    """The run's iterations found in storage (retried like a stage on transient storage faults);
    with `check_version`, first refuse a run stored by another pipeline version."""
    store = Store(storage)
    if check_version:
        check_stored_version(store, run)
    return read_history(store, run)


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
    """The checkpoint the run continues from: the last promoted iteration's M_i, else M0."""
    base = promoted_base(done)
    return base.model if base is not None else run_seed_model(config)


@task(name="prune-checkpoints", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def prune_checkpoints_task(
    storage: StorageConfig, run: str, keep_last: int | None, newest: int, base: int | None = None
) -> CheckpointRetention:
    """Old checkpoints of the run removed by the retention setting, keeping iteration `newest`'s and
    the promoted base's (iteration `base`, the next iteration's starting point)."""
    retention = prune_checkpoints(Store(storage), run, keep_last, newest, protect=() if base is None else (base,))
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
    start_iteration: int | None = None,
) -> RunOutcome:
    """Run `config` from where storage says it stands up to `max_iterations` (at most
    `max_new_iterations` more when given); `refresh` runs every stage again instead of taking its
    cached result (from M0 unless `start_iteration` is given).

    `start_iteration` I runs iteration I again (after changing one of its settings, say) and the
    ones after it, from the checkpoint iteration I starts from (M_{I-1}); None resumes after the
    last complete iteration. A base that was never trained or was pruned is refused before any
    stage runs.

    Only one flow run works on a named run at a time (`flows.concurrency`): while another holds
    the run, `if_busy="wait"` waits for it and `"skip"` ends at once, changing nothing.

    The run's writer lease (`metareward.lease`) is held for the whole body, iterations included:
    when another process writes the run (a CLI command, another server's flow run), the flow ends
    Failed with `RunLeaseHeld` naming it, or with `if_busy="skip"` is skipped, before any work."""
    check_execution(config)  # a Ray setup that cannot work fails before the seed model is even converted
    check_inputs_task(config)  # runs started from the UI or a deployment never passed the CLI's check
    with hold_slots([run_slot_name(config.name)], f"run {config.name}", wait=if_busy == "wait") as held:
        if not held:
            return _skipped(config, "another flow run is working on this run (its slot is held)")
        try:
            with flow_run_lease(config.storage, config.name):
                return _continue_run(config, refresh, max_new_iterations, start_iteration)
        except RunLeaseHeld as error:
            if if_busy == "skip":
                return _skipped(config, f"another writer holds the run's lease ({error.holder.describe()})")
            # One line in the log and the UI instead of a traceback; the caller gets `error` raised.
            return Failed(message=str(error), data=error)
        except GateStopped as error:  # a gate's policy, a rejection, a timeout: its message names the checks or the gate
            get_run_logger().error("run %s stopped: %s", config.name, error)
            return Failed(message=str(error), data=error)


def _rejections_stop(config: RunConfig, rejected: int) -> str:
    return (
        f"stopped: the M_i of the last {rejected} iteration(s) in a row were not promoted "
        f"(checks.max_consecutive_rejections {config.checks.max_consecutive_rejections}); see their promotion records"
    )


def _skipped(config: RunConfig, why: str) -> RunOutcome:
    stopped = f"skipped: {why}; nothing changed"
    get_run_logger().warning("run %s %s", config.name, stopped)
    done = completed_prefix(read_history_task(config.storage, config.name))
    return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=_newest_checkpoint(config, done))


def _continue_run(config: RunConfig, refresh: bool, max_new_iterations: int | None, start_iteration: int | None) -> RunOutcome:
    """The body of `run_flow`, run while it holds the run's slot."""
    if start_iteration is not None:
        return _run_iterations(config, refresh, max_new_iterations, start_iteration)
    logger = get_run_logger()
    # A run stored by other code would be recomputed and its checkpoints overwritten: refused there.
    done = [] if refresh else completed_prefix(read_history_task(config.storage, config.name, check_version=True))
    model = _newest_checkpoint(config, done)
    if done:
        logger.info("run %s: iterations 1-%d are complete in storage", config.name, len(done))
    if len(done) >= config.max_iterations and done[-1].trained:
        stopped = f"finished: iterations 1-{len(done)} of max_iterations {config.max_iterations} are complete; nothing to do"
        logger.info("run %s %s (promoted checkpoint %s)", config.name, stopped, model.uri)
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=model)
    if done and not done[-1].trained:
        stopped = f"iteration {done[-1].iteration} trained no model, so the run cannot go on: {done[-1].message}"
        logger.warning(stopped)
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=model)
    rejected = trailing_rejections(done)
    if rejected >= config.checks.max_consecutive_rejections:
        stopped = _rejections_stop(config, rejected)
        logger.warning(stopped)
        return RunOutcome(run=config.name, resumed_after=len(done), stopped=stopped, model=model)

    return _run_iterations(config, refresh, max_new_iterations, len(done) + 1, model, done)


def _run_iterations(
    config: RunConfig,
    refresh: bool,
    max_new_iterations: int | None,
    start: int,
    model: ModelRef | None = None,
    done: list[IterationRecord] | None = None,
) -> RunOutcome:
    """Iterations `start`, `start` + 1, ... from `model` after `done`, the complete iterations before
    `start` (both None: read from storage, the checkpoint iteration `start` starts from checked
    before any stage runs)."""
    logger = get_run_logger()
    if start > config.max_iterations:
        raise ValueError(f"start_iteration {start} is past max_iterations ({config.max_iterations}) of run {config.name}")
    if model is None:
        history = read_history_task(config.storage, config.name, check_version=not refresh)
        model = base_of_iteration(history, start, config.name) or run_seed_model(config)
        logger.info("run %s: iteration %d starts again from %s", config.name, start, model.uri)
        done = completed_prefix(history)[: start - 1]
    last = config.max_iterations
    if max_new_iterations is not None:
        last = min(last, start + max_new_iterations - 1)
    outcomes: list[IterationOutcome] = []
    stopped = None
    rejected = trailing_rejections(done)
    promoted = promoted_base(done)
    base = promoted.iteration if promoted is not None else None  # the iteration whose M_i is the base (None: M0)
    for iteration in range(start, last + 1):
        check_lease(config.storage, config.name)  # a lost lease (another writer took it over) stops here
        outcome = iteration_flow(config, iteration, model, refresh)
        outcomes.append(outcome)
        if outcome.model is None:
            stopped = f"iteration {iteration} trained no model, so the run stops: {outcome.message}"
            logger.warning(stopped)
            break
        if outcome.promoted:
            model, base, rejected = outcome.model, iteration, 0
        else:
            rejected += 1
            logger.warning("iteration %d: M%d not promoted (%s); the next iteration starts again from %s",
                           iteration, iteration, outcome.promotion_reason, model.uri)
        prune_checkpoints_task(
            config.storage, config.name, config.keep_last_checkpoints, iteration, base
        )
        if rejected >= config.checks.max_consecutive_rejections:
            stopped = _rejections_stop(config, rejected)
            logger.warning(stopped)
            break
    if stopped is None:
        stopped = (
            f"reached max_iterations ({config.max_iterations})"
            if last >= config.max_iterations
            else f"ran the {max_new_iterations} iteration(s) asked for"
        )
    logger.info("run %s stopped: %s; promoted checkpoint %s", config.name, stopped, model.uri)
    return RunOutcome(run=config.name, resumed_after=start - 1, iterations=outcomes, stopped=stopped, model=model)

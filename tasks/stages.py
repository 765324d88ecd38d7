"""One Prefect task per stage of an iteration: a thin shell over `metareward.stages`.

Each task takes small inputs (the run's `StorageConfig`, the iteration's `IterationConfig`, the
checkpoint `ModelRef`, the upstream stages' typed results), projects the stage's settings from the
config (`metareward.contract`), calls the plain stage function, which reads its inputs from storage
and writes its own Parquet, publishes the stage's artifacts (`tasks.reporting`) and returns the
stage's typed result: URIs, the fingerprint and a typed summary, never a table.

Caching: `tasks.cache.StageCachePolicy` keys each task by its slot and the stage's fingerprint
(`metareward.contract`: settings, checkpoint sha256, upstream keys, input digests, schema and
pipeline version), the same value its artifacts' manifests carry; the result record is written to
the run's store by the result storage `StageRuns` gives the task. A task that really runs first
forgets the records of its slot made with other inputs (`forget_other_records`).

Retries: `tasks.retries` (transient faults only, exponential backoff). A retried or re-run stage
resumes from the shards it already committed; with `refresh` the first attempt discards them.

Shards: with `execution.backend: ray` the sharded stages hand their pending shards to
`tasks.shards` (one Ray task each, in the generation subflow's Ray task runner); otherwise they
compute them in this process.
"""

from __future__ import annotations

from typing import Any, Callable, ParamSpec, TypeVar

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from metareward import contract
from metareward import stages as stage_functions
from metareward.checkpoints import ModelRef
from metareward.config import IterationConfig
from metareward.lease import check_lease
from metareward.stages import (
    META_TARGETS,
    SCORES,
    ActorPairsResult,
    ChecksResult,
    GenerateResult,
    JudgePairsResult,
    JudgeResult,
    MetaJudgeResult,
    SamplePromptsResult,
    ShardRunner,
    StageResult,
    SummaryResult,
    TrainResult,
)
from metareward.storage import StorageConfig, Store
from tasks.cache import StageCachePolicy, ensure_run_cache_storage, forget_other_records, stage_cache_key, upstream_keys
from tasks.reporting import publish_stage, stage_progress
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault
from tasks.shards import ray_shard_runner

P = ParamSpec("P")
R = TypeVar("R", bound=StageResult)


def _stage_task(stage: contract.Stage) -> Callable[[Callable[P, R]], Task[P, R]]:
    """The decorator shared by every stage task: cache policy, result persistence, retries, run name."""
    slug = stage.name.replace("_", "-")
    return task(
        name=slug,
        task_run_name=f"{slug}-iter-{{config.iteration}}",
        cache_policy=StageCachePolicy(stage=stage.name),
        persist_result=True,
        retry_condition_fn=retry_on_transient_fault,
        **RETRY_OPTIONS,
    )


def _begin(
    stage: contract.Stage, storage: StorageConfig, config: IterationConfig, model: ModelRef | None, upstream: dict[str, Any]
) -> Store:
    """Open the store and forget the cache records of this slot made with other inputs; first,
    stop if this process has lost the run's writer lease (`metareward.lease`)."""
    check_lease(storage, config.run)
    store = Store(storage)
    key = stage_cache_key(stage.name, storage, config, model, upstream_keys(upstream))
    forgotten = forget_other_records(store, config.run, stage.name, config.iteration, keep=key)
    if forgotten:
        get_run_logger().info(
            "%s: the artifacts of iteration %d are recomputed with new inputs; forgot %d cache record(s) of earlier inputs",
            stage.name, config.iteration, len(forgotten),
        )
    return store


def _fresh() -> bool:
    """Whether a sharded stage discards the shards storage holds: on the first attempt of a task the
    flow runs with `refresh`; its retries resume from the shards that attempt committed."""
    context = TaskRunContext.get()
    return bool(context.task.refresh_cache) and context.task_run.run_count <= 1


def _shard_runner(config: IterationConfig) -> ShardRunner | None:
    """Where the stage's shards run: Ray tasks with `execution.backend: ray`, else this process."""
    return ray_shard_runner(config.execution.ray) if config.execution.backend == "ray" else None


def _finish(store: Store, config: IterationConfig, result: R) -> R:
    publish_stage(store, config, result)
    get_run_logger().info("%s of iteration %d: %s", result.stage, config.iteration, result.summary.model_dump(mode="json"))
    return result


@_stage_task(contract.SAMPLE_PROMPTS)
def sample_prompts(storage: StorageConfig, config: IterationConfig) -> SamplePromptsResult:
    """Iteration i's prompts from the configured pool (seeded; held-out slice never sampled)."""
    store = _begin(contract.SAMPLE_PROMPTS, storage, config, None, {})
    settings = contract.SamplePromptsSettings.of(config)
    return _finish(store, config, stage_functions.sample_prompts(store, config.run, settings))


@_stage_task(contract.GENERATE)
def generate(storage: StorageConfig, config: IterationConfig, model: ModelRef, prompts: SamplePromptsResult) -> GenerateResult:
    """The actor: K responses per prompt, in shards; exact duplicates removed (counted)."""
    store = _begin(contract.GENERATE, storage, config, model, {"prompts": prompts})
    settings = contract.GenerateSettings.of(config)
    with stage_progress(config, "generate") as progress:
        result = stage_functions.generate(
            store, config.run, settings, config.engine, model, prompts.uri,
            progress=progress, fresh=_fresh(), runner=_shard_runner(config),
        )
    return _finish(store, config, result)


@_stage_task(contract.JUDGE)
def judge(
    storage: StorageConfig, config: IterationConfig, model: ModelRef, prompts: SamplePromptsResult, responses: GenerateResult
) -> JudgeResult:
    """The judge: N judgments per response, in shards, and the per-response scores."""
    store = _begin(contract.JUDGE, storage, config, model, {"prompts": prompts, "responses": responses})
    settings = contract.JudgeSettings.of(config)
    with stage_progress(config, "judge") as progress:
        result = stage_functions.judge(
            store, config.run, settings, config.engine, model, prompts.uri, responses.uri,
            progress=progress, fresh=_fresh(), runner=_shard_runner(config),
        )
    return _finish(store, config, result)


@_stage_task(contract.META_JUDGE)
def meta_judge(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    prompts: SamplePromptsResult,
    responses: GenerateResult,
    judgments: JudgeResult,
) -> MetaJudgeResult:
    """The meta-judge: both orders of every pair of judgments of each prompt's most disputed response."""
    store = _begin(contract.META_JUDGE, storage, config, model, {"prompts": prompts, "responses": responses, "judgments": judgments})
    settings = contract.MetaJudgeSettings.of(config)
    with stage_progress(config, "meta_judge") as progress:
        result = stage_functions.meta_judge(
            store, config.run, settings, config.engine, model, prompts.uri, responses.uri, judgments.uri,
            progress=progress, fresh=_fresh(), runner=_shard_runner(config),
        )
    return _finish(store, config, result)


@_stage_task(contract.ACTOR_PAIRS)
def actor_pairs(
    storage: StorageConfig,
    config: IterationConfig,
    prompts: SamplePromptsResult,
    responses: GenerateResult,
    judgments: JudgeResult,
) -> ActorPairsResult:
    """Length-controlled actor pairs from the responses' mean scores."""
    store = _begin(contract.ACTOR_PAIRS, storage, config, None, {"prompts": prompts, "responses": responses, "judgments": judgments})
    settings = contract.ActorPairsSettings.of(config)
    result = stage_functions.actor_pairs(store, config.run, settings, prompts.uri, responses.uri, judgments.uris[SCORES])
    return _finish(store, config, result)


@_stage_task(contract.JUDGE_PAIRS)
def judge_pairs(
    storage: StorageConfig,
    config: IterationConfig,
    prompts: SamplePromptsResult,
    responses: GenerateResult,
    judgments: JudgeResult,
    meta_judgments: MetaJudgeResult,
) -> JudgePairsResult:
    """Judge pairs from the meta-judgments: position weights, Elo, best vs worst judgment."""
    upstream = {"prompts": prompts, "responses": responses, "judgments": judgments, "meta_judgments": meta_judgments}
    store = _begin(contract.JUDGE_PAIRS, storage, config, None, upstream)
    settings = contract.JudgePairsSettings.of(config)
    result = stage_functions.judge_pairs(
        store, config.run, settings, prompts.uri, responses.uri, judgments.uri,
        meta_judgments.uris[META_TARGETS], meta_judgments.uri,
    )
    return _finish(store, config, result)


@_stage_task(contract.PRE_TRAIN_CHECKS)
def pre_train_checks(
    storage: StorageConfig,
    config: IterationConfig,
    responses: GenerateResult,
    judgments: JudgeResult,
    actor_pairs: ActorPairsResult,
    meta_judgments: MetaJudgeResult | None = None,
    judge_pairs: JudgePairsResult | None = None,
    previous: SummaryResult | None = None,
) -> ChecksResult:
    """The judge-health checks before training (one row per check in the UI's table artifact);
    `previous`: the previous iteration's summary, for the changes against it."""
    upstream = {
        "responses": responses, "judgments": judgments, "actor_pairs": actor_pairs,
        "meta_judgments": meta_judgments, "judge_pairs": judge_pairs, "previous": previous,
    }
    store = _begin(contract.PRE_TRAIN_CHECKS, storage, config, None, upstream)
    settings = contract.PreTrainChecksSettings.of(config)
    result = stage_functions.pre_train_checks(
        store, config.run, settings, responses.uri, judgments.uri, actor_pairs.uri,
        meta_judgments.uri if meta_judgments is not None else None,
        judge_pairs.uri if judge_pairs is not None else None,
        previous.uri if previous is not None else None,
    )
    return _finish(store, config, result)


@_stage_task(contract.TRAIN)
def train(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    actor_pairs: ActorPairsResult,
    judge_pairs: JudgePairsResult | None = None,
) -> TrainResult:
    """DPO on the actor and judge pairs: M_{i-1} -> M_i (the engines are released first). With
    `training.num_processes` > 1 the ranks run in a child process group that dies with this
    process (a cancelled flow run's process is ended, and the group with it); with
    `training.save_steps` a retried or re-run task resumes from the newest trainer checkpoint."""
    store = _begin(contract.TRAIN, storage, config, model, {"actor_pairs": actor_pairs, "judge_pairs": judge_pairs})
    settings = contract.TrainSettings.of(config)
    judge_pairs_uri = judge_pairs.uri if judge_pairs is not None else None
    with stage_progress(config, "train") as progress:
        result = stage_functions.train(
            store, config.run, settings, model, actor_pairs.uri, judge_pairs_uri, progress=progress, ray=config.execution.ray
        )
    return _finish(store, config, result)


@_stage_task(contract.SUMMARY)
def summary(storage: StorageConfig, config: IterationConfig, model: ModelRef, results: list[StageResult]) -> SummaryResult:
    """The iteration at a glance: one row per stage and the key metrics, M_{i-1} and M_i."""
    store = _begin(contract.SUMMARY, storage, config, model, {"results": results})
    settings = contract.SummarySettings.of(config)
    return _finish(store, config, stage_functions.summary(store, config.run, settings, model, results))


@task(name="previous-iteration-summary", cache_policy=NO_CACHE, retry_condition_fn=retry_on_transient_fault, **RETRY_OPTIONS)
def previous_iteration_summary(storage: StorageConfig, config: IterationConfig) -> SummaryResult | None:
    """The previous iteration's stored summary (None in iteration 1): the checks compare with it."""
    if config.iteration == 1:
        return None
    return stage_functions.stored_summary(Store(storage), config.run, config.iteration - 1)


class StageRuns:
    """Runs stage tasks with the run's result storage and the refresh flag, keeping their results
    and final state names by stage (a flow's record of what its stages did):
    `runs(judge, storage, settings, model, prompts, responses)` calls the task `judge` and returns
    its typed result."""

    def __init__(self, storage: StorageConfig, run: str, refresh: bool):
        self.result_storage = ensure_run_cache_storage(storage, run)
        self.refresh = refresh
        self.results: dict[str, StageResult] = {}
        self.states: dict[str, str] = {}

    def __call__(self, stage_task: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        configured = stage_task.with_options(result_storage=self.result_storage, refresh_cache=self.refresh)
        state = configured(*args, return_state=True, **kwargs)
        result = state.result()  # re-raises the task's error: the flow fails with the stage's own message
        self.results[result.stage] = result
        self.states[result.stage] = state.name
        return result

    def record(self, results: dict[str, StageResult], states: dict[str, str]) -> None:
        """Add what a subflow's stages did."""
        self.results.update(results)
        self.states.update(states)

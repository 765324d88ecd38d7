"""One Prefect task per stage of an iteration: a thin shell over `metareward.stages`.

Each task takes small inputs (the run's `StorageConfig`, the iteration's `IterationConfig`, the
checkpoint `ModelRef`, the upstream stages' `StageResult`s), calls the plain stage function, which
reads its inputs from storage and writes its own Parquet, publishes the stage's artifacts
(`tasks.reporting`) and returns the `StageResult`: URIs, keys and a small summary, never a table.

Caching: `metareward.caching.StageCachePolicy` keys each task by stage, checkpoint sha256, the
stage's settings, the upstream keys and the pipeline version; the result record is written to
the run's store by the result storage the flow gives the task (`configured`). A task that really
runs first forgets the records of its slot made with other inputs (`forget_other_records`).

Retries: `tasks.retries` (transient faults only, exponential backoff). A retried or re-run stage
resumes from the shards it already committed; with `refresh` the first attempt discards them.

Shards: with `execution.backend: ray` the sharded stages hand their pending shards to
`tasks.shards` (one Ray task each, in the generation subflow's Ray task runner); otherwise they
compute them in this process.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.context import TaskRunContext

from metareward import stages as stage_functions
from metareward.caching import (
    StageCachePolicy,
    ensure_run_cache_storage,
    forget_other_records,
    stage_cache_key,
    upstream_keys,
)
from metareward.checkpoints import ModelRef
from metareward.config import IterationConfig
from metareward.stages import META_TARGETS, SCORES, ShardRunner, StageResult
from metareward.storage import StorageConfig, Store
from tasks.reporting import publish_stage, stage_progress
from tasks.retries import RETRY_OPTIONS, retry_on_transient_fault
from tasks.shards import ray_shard_runner


def _stage_task(stage: str):
    """The decorator shared by every stage task: cache policy, result persistence, retries, run name."""
    return task(
        name=stage.replace("_", "-"),
        task_run_name=f"{stage.replace('_', '-')}-iter-{{config.iteration}}",
        cache_policy=StageCachePolicy(stage=stage),
        persist_result=True,
        retry_condition_fn=retry_on_transient_fault,
        **RETRY_OPTIONS,
    )


def _begin(
    stage: str,
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef | None,
    upstream: dict[str, Any],
) -> Store:
    """Open the store and forget the cache records of this slot made with other inputs."""
    store = Store(storage)
    key = stage_cache_key(stage, config, model, upstream_keys(upstream))
    forgotten = forget_other_records(store, config.run, stage, config.iteration, keep=key)
    if forgotten:
        get_run_logger().info(
            "%s: the artifacts of iteration %d are recomputed with new inputs; forgot %d cache record(s) of earlier inputs",
            stage, config.iteration, len(forgotten),
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


def _finish(store: Store, config: IterationConfig, result: StageResult) -> StageResult:
    publish_stage(store, config, result)
    get_run_logger().info("%s of iteration %d: %s", result.stage, config.iteration, result.summary)
    return result


@_stage_task("sample_prompts")
def sample_prompts(storage: StorageConfig, config: IterationConfig) -> StageResult:
    """Iteration i's prompts from the configured pool (seeded; held-out slice never sampled)."""
    store = _begin("sample_prompts", storage, config, None, {})
    return _finish(store, config, stage_functions.sample_prompts(store, config))


@_stage_task("generate")
def generate(storage: StorageConfig, config: IterationConfig, model: ModelRef, prompts: StageResult) -> StageResult:
    """The actor: K responses per prompt, in shards; exact duplicates removed (counted)."""
    store = _begin("generate", storage, config, model, {"prompts": prompts})
    with stage_progress(config, "generate") as progress:
        result = stage_functions.generate(
            store, config, model, prompts.uri, progress=progress, fresh=_fresh(), runner=_shard_runner(config)
        )
    return _finish(store, config, result)


@_stage_task("judge")
def judge(
    storage: StorageConfig, config: IterationConfig, model: ModelRef, prompts: StageResult, responses: StageResult
) -> StageResult:
    """The judge: N judgments per response, in shards, and the per-response scores."""
    store = _begin("judge", storage, config, model, {"prompts": prompts, "responses": responses})
    with stage_progress(config, "judge") as progress:
        result = stage_functions.judge(
            store, config, model, prompts.uri, responses.uri, progress=progress, fresh=_fresh(), runner=_shard_runner(config)
        )
    return _finish(store, config, result)


@_stage_task("meta_judge")
def meta_judge(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    prompts: StageResult,
    responses: StageResult,
    judgments: StageResult,
) -> StageResult:
    """The meta-judge: both orders of every pair of judgments of each prompt's most disputed response."""
    upstream = {"prompts": prompts, "responses": responses, "judgments": judgments}
    store = _begin("meta_judge", storage, config, model, upstream)
    with stage_progress(config, "meta_judge") as progress:
        result = stage_functions.meta_judge(
            store,
            config,
            model,
            prompts.uri,
            responses.uri,
            judgments.uri,
            progress=progress,
            fresh=_fresh(),
            runner=_shard_runner(config),
        )
    return _finish(store, config, result)


@_stage_task("actor_pairs")
def actor_pairs(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    prompts: StageResult,
    responses: StageResult,
    judgments: StageResult,
) -> StageResult:
    """Length-controlled actor pairs from the responses' mean scores."""
    upstream = {"prompts": prompts, "responses": responses, "judgments": judgments}
    store = _begin("actor_pairs", storage, config, model, upstream)
    result = stage_functions.actor_pairs(store, config, prompts.uri, responses.uri, judgments.uris[SCORES])
    return _finish(store, config, result)


@_stage_task("judge_pairs")
def judge_pairs(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    prompts: StageResult,
    responses: StageResult,
    judgments: StageResult,
    meta_judgments: StageResult,
) -> StageResult:
    """Judge pairs from the meta-judgments: position weights, Elo, best vs worst judgment."""
    upstream = {"prompts": prompts, "responses": responses, "judgments": judgments, "meta_judgments": meta_judgments}
    store = _begin("judge_pairs", storage, config, model, upstream)
    result = stage_functions.judge_pairs(
        store,
        config,
        prompts.uri,
        responses.uri,
        judgments.uri,
        meta_judgments.uris[META_TARGETS],
        meta_judgments.uri,
    )
    return _finish(store, config, result)


@_stage_task("train")
def train(
    storage: StorageConfig,
    config: IterationConfig,
    model: ModelRef,
    actor_pairs: StageResult,
    judge_pairs: StageResult | None = None,
) -> StageResult:
    """DPO on the actor and judge pairs: M_{i-1} -> M_i (the engines are released first). With
    `training.num_processes` > 1 the ranks run in a child process group that dies with this
    process (a cancelled flow run's process is ended, and the group with it); with
    `training.save_steps` a retried or re-run task resumes from the newest trainer checkpoint."""
    upstream = {"actor_pairs": actor_pairs, "judge_pairs": judge_pairs}
    store = _begin("train", storage, config, model, upstream)
    judge_pairs_uri = judge_pairs.uri if judge_pairs is not None else None
    with stage_progress(config, "train") as progress:
        result = stage_functions.train(store, config, model, actor_pairs.uri, judge_pairs_uri, progress=progress)
    return _finish(store, config, result)


@_stage_task("summary")
def summary(storage: StorageConfig, config: IterationConfig, model: ModelRef, results: list[StageResult]) -> StageResult:
    """The iteration at a glance: one row per stage and the key metrics."""
    store = _begin("summary", storage, config, model, {"results": results})
    return _finish(store, config, stage_functions.summary(store, config, model, results))


STAGE_TASKS: dict[str, Task[..., StageResult]] = {
    "sample_prompts": sample_prompts,
    "generate": generate,
    "judge": judge,
    "meta_judge": meta_judge,
    "actor_pairs": actor_pairs,
    "judge_pairs": judge_pairs,
    "train": train,
    "summary": summary,
}


class StageCalls:
    """Runs stage tasks with the run's result storage and the refresh flag, keeping their results
    and final state names by stage (a flow's record of what its stages did)."""

    def __init__(self, storage: StorageConfig, run: str, refresh: bool):
        self.result_storage = ensure_run_cache_storage(storage, run)
        self.refresh = refresh
        self.results: dict[str, StageResult] = {}
        self.states: dict[str, str] = {}

    def __call__(self, stage: str, *args: Any) -> StageResult:
        state = configured(STAGE_TASKS[stage], self.result_storage, self.refresh)(*args, return_state=True)
        result = state.result()  # re-raises the task's error: the flow fails with the stage's own message
        self.results[stage] = result
        self.states[stage] = state.name
        return result


def configured(stage_task: Task[..., StageResult], result_storage: str, refresh: bool) -> Task[..., StageResult]:
    """The task writing its cache record to `result_storage` (a saved block's slug, from
    `metareward.caching.ensure_run_cache_storage`); `refresh` recomputes and overwrites the record."""
    return stage_task.with_options(result_storage=result_storage, refresh_cache=refresh)

"""The generation stages of an iteration as one subflow: the same model as actor, judge and meta-judge.

    generate -> judge -> [meta-judge]

With `execution.backend: local` the subflow runs them in the flow's process, shard after shard.
With `ray` it owns a Ray task runner (`flows.ray_runner.ClusterTaskRunner`) and each stage hands
its pending shards to it, one `shard` task per shard (`tasks.shards`), one engine per GPU, loaded
once per worker process and kept for every shard and stage of the subflow. When the subflow
ends, its Ray connection closes and its workers, with their engines and GPU memory, are gone:
training starts with the GPUs free. Each stage task is cached by checkpoint hash as before; a
re-run flow recomputes only the shards its stage's manifest lacks.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from metareward.checkpoints import ModelRef
from metareward.config import IterationConfig, RunConfig
from metareward.execution import (
    ExecutionError,
    check_auto_finds_a_cluster,
    check_ray_execution,
    engine_slots,
    local_workers_still_running,
    missing_extra,
    shard_size_advice,
)
from metareward.stages import GenerateResult, JudgeResult, MetaJudgeResult, SamplePromptsResult, StageResult
from metareward.storage import Store
from tasks.stages import StageRuns, generate, judge, meta_judge


class GenerationOutcome(BaseModel):
    """The generation stages' results (`meta_judgments` None in an iteration that trains no judge
    pairs) and their final Prefect state names by stage name, in run order."""

    model_config = ConfigDict(extra="forbid")

    responses: GenerateResult
    judgments: JudgeResult
    meta_judgments: MetaJudgeResult | None = None
    states: dict[str, str] = Field(default_factory=dict)

    @property
    def results(self) -> dict[str, StageResult]:
        computed = (self.responses, self.judgments, self.meta_judgments)
        return {result.stage: result for result in computed if result is not None}


def check_execution(config: RunConfig) -> None:
    """Refuse at once a Ray setup that cannot work (the `metareward[ray]` extra missing; for a
    cluster: no expected GPU count, a local storage root, the temporary Prefect API; `auto` with
    no cluster to find), with a message that says what to change. A no-op unless the stages
    (`execution.backend: ray`) or DPO (`training.launcher: ray_train`) run on Ray."""
    if config.execution.backend != "ray" and config.training.launcher != "ray_train":
        return
    from prefect.settings import PREFECT_API_URL

    try:
        import prefect_ray  # noqa: F401
    except ImportError as error:
        raise missing_extra("execution.backend is 'ray'", error) from None
    store = Store(config.storage)
    check_ray_execution(config.execution.ray, config.storage.root, store.protocol, PREFECT_API_URL.value())
    check_auto_finds_a_cluster(config.execution.ray)


def _log_ray_plan(settings: IterationConfig, prompts: SamplePromptsResult) -> None:
    """The cluster the subflow is connected to, and a warning when the shards are too few for it."""
    import ray

    ray_settings = settings.execution.ray
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    engines = engine_slots(ray_settings, gpus, cpus)
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    logger = get_run_logger()
    logger.info("Ray cluster: %d node(s), %g GPU(s), %g CPU(s): %d engine(s) at a time", nodes, gpus, cpus, engines)
    advice = shard_size_advice(ray_settings, prompts.summary.prompts, settings.shard_size, engines)
    if advice:
        logger.warning(advice)


@flow(name="metareward-generation", flow_run_name="{config.name}-iter-{iteration}-generation")
def generation_flow(
    config: RunConfig, iteration: int, model: ModelRef, prompts: SamplePromptsResult, refresh: bool = False
) -> GenerationOutcome:
    """Actor, judge and (in iterations that train judge pairs) meta-judge for iteration `iteration`
    of run `config`, from checkpoint `model` (M_{i-1}) and the iteration's sampled `prompts`."""
    settings = config.for_iteration(iteration)
    storage = config.storage
    runs = StageRuns(storage, settings.run, refresh)
    if settings.execution.backend == "ray":
        _log_ray_plan(settings, prompts)

    responses = runs(generate, storage, settings, model, prompts)
    judgments = runs(judge, storage, settings, model, prompts, responses)
    meta_judgments = None
    if settings.pairs.train_judge_pairs:
        meta_judgments = runs(meta_judge, storage, settings, model, prompts, responses, judgments)
    return GenerationOutcome(responses=responses, judgments=judgments, meta_judgments=meta_judgments, states=runs.states)


# How long the Ray workers of a finished generation subflow get to exit before training refuses to start.
WORKER_EXIT_TIMEOUT_S = 60.0


def ensure_workers_gone(config: RunConfig, outcome: GenerationOutcome) -> None:
    """After a Ray generation subflow: wait until its worker processes on this machine have exited
    (their engines hold GPU memory DPO needs) and fail the iteration if one has not."""
    if config.execution.backend != "ray":
        return
    computed = [result for stage, result in outcome.results.items() if outcome.states.get(stage) != "Cached"]
    workers = sorted({worker for result in computed for worker in result.summary.execution.workers})
    alive = local_workers_still_running(workers, WORKER_EXIT_TIMEOUT_S)
    if alive:
        raise ExecutionError(
            f"the generation subflow ended but its Ray worker process(es) {alive} are still running after "
            f"{WORKER_EXIT_TIMEOUT_S:g} s; their engines would hold the GPUs training needs"
        )
    get_run_logger().info("generation workers exited before training: %d shard worker(s) computed this iteration", len(workers))


def generation_subflow(config: RunConfig) -> Any:
    """The generation flow with the task runner `config.execution` asks for."""
    if config.execution.backend != "ray":
        return generation_flow
    from flows.ray_runner import ClusterTaskRunner

    return generation_flow.with_options(task_runner=ClusterTaskRunner(config.execution.ray))

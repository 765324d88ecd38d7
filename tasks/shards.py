"""Shards as Prefect tasks on Ray: the `ShardRunner` of `execution.backend: ray`.

A sharded stage task (generate, judge, meta-judge) running inside the generation subflow
(`flows.generation`) hands its pending shards to `ray_shard_runner`, which submits one `shard`
task per shard to the subflow's Ray task runner with

    remote_options(num_gpus=gpus_per_engine, num_cpus=cpus_per_engine, max_calls=0, max_retries=...)

`max_calls=0` keeps a worker process alive between shards (Ray's default for GPU tasks is a fresh
process per task), so the engine it loaded for the first shard, cached by checkpoint hash in
`metareward.engines`, serves every later shard and stage of the subflow: one model load per GPU.
Ray runs a shard again when its worker or node dies (`max_shard_retries`); each shard is committed
atomically, so a shard run twice is still in the table once.

Deadlines: Prefect's `timeout_seconds` is not enforced on Ray, so with `shard_timeout_s` the shard
itself arms a timer in its worker (`shard_deadline`): a shard past it raises
`ShardDeadlineExceeded` (a `TimeoutError`: the stage task's retries redo only the missing shards)
and its worker drops its engine, since a request may still be in flight inside it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from metareward.execution import RayExecutionConfig
from metareward.stages import ShardJob, ShardReport, run_shard


class ShardDeadlineExceeded(TimeoutError):
    """A shard ran longer than `execution.ray.shard_timeout_s`."""


@contextlib.contextmanager
def shard_deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise `ShardDeadlineExceeded` in this (main) thread once `seconds` have passed; 0: no deadline.
    A Ray task runs in its worker's main thread, where a signal handler can interrupt it."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ShardDeadlineExceeded(f"{what} ran past execution.ray.shard_timeout_s = {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@task(
    name="shard",
    task_run_name="{job.stage}-iter-{job.settings.iteration}-shard-{job.index}",
    cache_policy=NO_CACHE,  # the stage task is the cached unit; a shard is resumed from storage instead
    persist_result=False,
)
def shard(job: ShardJob, timeout_s: float = 0.0) -> ShardReport:
    """Compute and commit one shard of a stage (`metareward.stages.run_shard`) on a Ray worker."""
    try:
        with shard_deadline(timeout_s, f"shard {job.index} of {job.uri}"):
            return run_shard(job)
    except ShardDeadlineExceeded:
        from metareward.engines import release_engines

        release_engines()
        raise


def ray_shard_runner(ray: RayExecutionConfig) -> Callable[[Sequence[ShardJob], Callable[[ShardReport], None]], list[ShardReport]]:
    """A `ShardRunner` submitting each shard as a `shard` task to the current flow's Ray task runner."""

    def run(jobs: Sequence[ShardJob], on_done: Callable[[ShardReport], None]) -> list[ShardReport]:
        import ray as ray_module
        from prefect_ray.context import remote_options

        with remote_options(
            num_gpus=ray.gpus_per_engine,
            num_cpus=ray.cpus_per_engine,
            max_calls=0,
            max_retries=ray.max_shard_retries,
        ):
            futures = [shard.submit(job, timeout_s=ray.shard_timeout_s) for job in jobs]
        pending = {future.wrapped_future: future for future in futures}
        reports = []
        while pending:
            ready, _ = ray_module.wait(list(pending), num_returns=1)
            report = pending.pop(ready[0]).result()  # a failed shard raises its own error here
            reports.append(report)
            on_done(report)
        return reports

    return run

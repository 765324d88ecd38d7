"""Sharded stages (generate, judge, meta_judge): shard plans, seeds, and where shards run.

Shard k holds the prompts at positions [k * shard_size, (k + 1) * shard_size) of the prompts
artifact, and everything derived from them. Each shard is committed on its own
(`metareward.storage.ShardedArtifact`); a stage that is killed and run again redoes only the
shards that are missing, and the final table has every row exactly once. Each shard's sampling seed
is derived from (run seed, iteration, stage, shard index), so a shard run again repeats the same
texts and the resumed table equals an uninterrupted run's.

Each pending shard becomes a `ShardJob` (its own input rows, the stage's settings, the engine
config, the checkpoint, the artifact) computed by `run_shard` and committed by it; a `ShardRunner`
decides where: in this process, in order (the default), or as Ray tasks over a cluster's GPUs
(`tasks.shards`, `execution.backend: ray`). The same seeds give the same tables either way.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Callable, Sequence

import pandas as pd
from pydantic import BaseModel, ConfigDict

from metareward.checkpoints import ModelRef
from metareward.contract import StageSettings
from metareward.engines.base import Engine, EngineConfig
from metareward.hashing import tie_break_key
from metareward.schema import PROMPT_ID
from metareward.stages.common import ProgressCallback, checkpoint_fs, report_progress
from metareward.storage import ArtifactInfo, ShardedArtifact, StorageConfig, Store
from metareward.summaries import ShardExecution, WorkerCounts

logger = logging.getLogger(__name__)

# Sampling seeds are kept below 2**31: every backend (torch, numpy, vLLM) accepts them.
_SEED_MODULUS = 2**31

# One shard's computation: (the engine, loaded on first call; the stage's settings; the shard's
# index; its input rows) -> its rows of the artifact.
ShardFunction = Callable[[Callable[[], Engine], StageSettings, int, pd.DataFrame], pd.DataFrame]


def shard_seed(settings: StageSettings, stage: str, shard: int, purpose: str = "sample") -> int:
    """The sampling seed of one shard: a stable hash of (run seed, iteration, stage, purpose, shard)."""
    seed, iteration = settings.seed, settings.iteration  # type: ignore[attr-defined]
    return tie_break_key(seed, f"iter-{iteration}/{stage}/{purpose}/shard-{shard}") % _SEED_MODULUS


def shard_prompt_ids(prompts: pd.DataFrame, shard_size: int) -> list[list[str]]:
    """The prompt ids of each shard, in the prompts artifact's order (at least one shard)."""
    ids = prompts[PROMPT_ID].astype(str).tolist()
    count = max(1, math.ceil(len(ids) / shard_size))
    return [ids[index * shard_size : (index + 1) * shard_size] for index in range(count)]


class ShardJob(BaseModel):
    """One shard of a sharded stage, complete enough to be computed by another process or machine:
    the store to write to, the stage's settings and shard function, the engine config (how to load
    the model), the checkpoint, the artifact being built and the shard's own input rows (`payload`:
    only the rows this shard reads, so nothing else travels)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    stage: str
    compute: ShardFunction
    storage: StorageConfig
    settings: StageSettings
    engine: EngineConfig
    model: ModelRef
    uri: str
    shard_count: int
    info: ArtifactInfo
    index: int
    payload: pd.DataFrame


class ShardReport(BaseModel):
    """What computing one shard did: its rows and seconds, the process that computed it
    (`host:pid`) and whether that process loaded the engine for it (False: already loaded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    rows: int
    seconds: float
    worker: str
    engine_loaded: bool


# Runs the given shard jobs (each through `run_shard`, wherever it runs), calling `on_done` with
# each shard's report as it finishes; returns every report. None means in this process, in order.
ShardRunner = Callable[[Sequence[ShardJob], Callable[[ShardReport], None]], list[ShardReport]]


def run_shard(job: ShardJob) -> ShardReport:
    """Compute one shard with the engine for its checkpoint (loaded once per process, kept for the
    next shard) and commit it to its artifact. Called in the stage's process or a Ray worker."""
    from metareward.engines import engine_is_loaded, load_engine

    store = Store(job.storage)
    started = time.perf_counter()
    loaded_before = engine_is_loaded(job.engine, job.model)
    engine = _LazyEngine(lambda: load_engine(job.engine, job.model, fs=checkpoint_fs(store)))
    table = job.compute(engine, job.settings, job.index, job.payload)
    seconds = time.perf_counter() - started
    artifact = ShardedArtifact(store, job.uri, job.shard_count, job.info)
    artifact.write_shard(job.index, table, seconds=seconds)
    logger.info("%s: shard %d of %d committed (%d rows)", job.uri, job.index + 1, job.shard_count, len(table))
    return ShardReport(
        index=job.index,
        rows=len(table),
        seconds=seconds,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        engine_loaded=engine.used and not loaded_before,
    )


class _LazyEngine:
    """The engine, loaded on first use only: a shard without rows loads no model."""

    def __init__(self, load: Callable[[], Engine]):
        self._load = load
        self._engine: Engine | None = None

    @property
    def used(self) -> bool:
        return self._engine is not None

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
        return self._engine


def run_shards_here(jobs: Sequence[ShardJob], on_done: Callable[[ShardReport], None]) -> list[ShardReport]:
    """The local `ShardRunner`: every shard in this process, in order."""
    reports = []
    for job in jobs:
        reports.append(run_shard(job))
        on_done(reports[-1])
    return reports


class ShardedRun(BaseModel):
    """What `run_shards` hands back: the finished table, its manifest and this call's reports."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    table: pd.DataFrame
    manifest: dict
    reports: list[ShardReport]

    @property
    def execution(self) -> ShardExecution:
        """Where this call's shards ran: shards and engine loads per worker process."""
        workers: dict[str, WorkerCounts] = {}
        for report in self.reports:
            counts = workers.get(report.worker, WorkerCounts())
            workers[report.worker] = WorkerCounts(
                shards=counts.shards + 1, engine_loads=counts.engine_loads + int(report.engine_loaded)
            )
        return ShardExecution(workers=workers, engine_loads=sum(counts.engine_loads for counts in workers.values()))


def run_shards(
    store: Store,
    stage: str,
    compute: ShardFunction,
    settings: StageSettings,
    engine: EngineConfig,
    model: ModelRef,
    uri: str,
    payloads: Sequence[pd.DataFrame],
    info: ArtifactInfo,
    key_columns: Sequence[str],
    progress: ProgressCallback | None,
    fresh: bool,
    runner: ShardRunner | None,
) -> ShardedRun:
    """Write every pending shard (through `runner`; in this process when None) and finalize the
    artifact. `fresh` discards what storage holds first."""
    artifact = ShardedArtifact(store, uri, len(payloads), info, fresh=fresh)
    pending = artifact.pending_shards()
    jobs = [
        ShardJob(
            stage=stage,
            compute=compute,
            storage=store.config.model_copy(update={"root": store.root}),  # absolute: workers have other cwds
            settings=settings,
            engine=engine,
            model=model,
            uri=uri,
            shard_count=len(payloads),
            info=info,
            index=index,
            payload=payloads[index],
        )
        for index in pending
    ]
    done = len(payloads) - len(pending)
    report_progress(progress, done, len(payloads))

    def on_done(report: ShardReport) -> None:
        nonlocal done
        done += 1
        report_progress(progress, done, len(payloads))

    reports = (runner or run_shards_here)(jobs, on_done) if jobs else []
    manifest = artifact.finalize(key_columns=list(key_columns))
    return ShardedRun(table=artifact.read(), manifest=manifest, reports=reports)

"""Prefect caching keyed by the stage fingerprint, with the cache records kept in the run's own store.

A stage task's cache key is its artifact slot and its fingerprint:

    {stage}-iter-{i}-{fingerprint}

where `fingerprint` is `metareward.contract.fingerprint` of the stage's declaration: the stage's
settings (exactly the fields it reads), the checkpoint's sha256, the upstream stages' fingerprints
(`StageResult.key`), the content digest of the prompt pool (`sample_prompts`), the schema and the
pipeline version. The stage function writes that same value into its artifacts' manifests and reuses
a complete or partly written artifact only when it matches. So re-running a finished iteration hits
the cache at every stage (no model is loaded), changing rho changes the key of actor-pair selection
and, through the upstream keys, of every stage after it, editing the prompt file in place changes
every key, and a new checkpoint or pipeline version changes every key.

What is cached is the task's return value, a `StageResult` (URIs, keys, a small summary): never a
table. Prefect writes it as a small record named by the key under `{root}/{run}/cache/` in the
run's store (a local folder or S3), through `RunCacheStorage`, a Prefect result-storage block
built from the run's `StorageConfig`. The block holds that config only, whose credentials are the
*names* of environment variables, so the copy Prefect saves on its server holds no secret.

One record per artifact slot: artifacts live at fixed places (`{root}/{run}/iter-{i}/{stage}`), so
when a stage runs with other inputs and overwrites its artifacts, the records of its earlier
inputs would point at data that is gone. `forget_other_records` (called by each task when it
really runs) deletes them, so going back to the earlier settings recomputes instead of returning a
stale result.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

import anyio.to_thread
from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from pydantic import PrivateAttr

from metareward.checkpoints import ModelRef
from metareward.config import IterationConfig
from metareward.contract import stage_named
from metareward.stages import StageResult, stage_fingerprint, summary_keys
from metareward.storage import StorageConfig, Store

CACHE_DIR = "cache"

_BLOCK_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def _slug(text: str) -> str:
    """Lowercase letters, digits and dashes only (Prefect's rule for block names and artifact keys)."""
    return _BLOCK_NAME_CHARS.sub("-", text.lower()).strip("-") or "x"


def record_prefix(stage: str, iteration: int) -> str:
    """The start of every cache key of `stage` in `iteration`: one artifact slot."""
    return f"{_slug(stage_named(stage).name)}-iter-{iteration}-"


def upstream_keys(inputs: Mapping[str, Any]) -> dict[str, str]:
    """The fingerprints of the upstream stages among a task's inputs: each `StageResult` by its
    argument name (its role), a list of them (the summary's) by each result's stage."""
    keys: dict[str, str] = {}
    for name, value in sorted(inputs.items()):
        if isinstance(value, StageResult):
            keys[name] = value.key
        elif isinstance(value, (list, tuple)) and value and all(isinstance(item, StageResult) for item in value):
            keys.update(summary_keys(value))
    return keys


def stage_cache_key(
    stage: str, storage: StorageConfig, config: IterationConfig, model: ModelRef | None, upstream: Mapping[str, str]
) -> str:
    """The cache key of `stage` run with these inputs: its slot and its fingerprint (see the module docstring)."""
    declared = stage_named(stage)
    settings = declared.settings.of(config)
    return record_prefix(stage, config.iteration) + stage_fingerprint(Store(storage), declared, settings, model, upstream)


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy of one stage's task: `stage_cache_key` of the task's inputs.

    The task takes the run's `StorageConfig` as `storage`, the iteration's settings as `config` (an
    `IterationConfig`) and, when the stage uses a model, the checkpoint as `model` (a `ModelRef`);
    each `StageResult` argument is an upstream stage, its name the role it is declared with in
    `metareward.contract` (a list of them: the summary's).
    """

    stage: str = ""

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str:
        storage, config, model = inputs.get("storage"), inputs.get("config"), inputs.get("model")
        if not isinstance(storage, StorageConfig):
            raise TypeError(f"StageCachePolicy({self.stage!r}): 'storage' must be a StorageConfig, got {type(storage).__name__}")
        if not isinstance(config, IterationConfig):
            raise TypeError(
                f"StageCachePolicy({self.stage!r}): the task needs an IterationConfig argument named 'config', "
                f"got {type(config).__name__}"
            )
        if model is not None and not isinstance(model, ModelRef):
            raise TypeError(f"StageCachePolicy({self.stage!r}): 'model' must be a ModelRef, got {type(model).__name__}")
        return stage_cache_key(self.stage, storage, config, model, upstream_keys(inputs))


def cache_uri(store: Store, run: str) -> str:
    """`{root}/{run}/cache`: where the run's cache records live."""
    return store.join(store.run_uri(run), CACHE_DIR)


def forget_other_records(store: Store, run: str, stage: str, iteration: int, keep: str) -> list[str]:
    """Delete the cache records of this artifact slot (stage, iteration) other than `keep`; return
    the keys deleted. Called when a stage really runs: it is about to overwrite the artifacts those
    records point at."""
    prefix = record_prefix(stage, iteration)
    folder = cache_uri(store, run)
    if not store.exists(folder):
        return []
    forgotten = []
    for uri in store.ls(folder):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix) and name != keep:
            store.rm(uri)
            forgotten.append(name)
    return forgotten


class RunCacheStorage(WritableFileSystem):
    """Prefect result storage in a metareward run's store: records at `{root}/{run}/cache/{key}`.

    Reads and writes go through `metareward.storage.Store` (atomic writes, the S3 endpoint and
    checksum settings of the run). `storage` is the run's `StorageConfig`, which names the
    environment variables holding credentials rather than holding them.
    """

    _block_type_name = "Metareward Run Cache"
    _block_type_slug = "metareward-run-cache"
    _description = "Cache records of a metareward run, kept in the run's own store (local folder or S3)."

    storage: StorageConfig
    run: str

    _store: Store | None = PrivateAttr(default=None)

    def _resolve(self, path: str) -> tuple[Store, str]:
        """The run's store (opened once) and the URI of the record `path`."""
        if self._store is None:
            self._store = Store(self.storage)
        return self._store, self._store.join(cache_uri(self._store, self.run), path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """The record `path`. (`_sync` is passed by Prefect's result store; the call is always synchronous.)"""
        store, uri = self._resolve(path)
        return store.read_bytes(uri)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Write the record `path` atomically; returns its URI."""
        store, uri = self._resolve(path)
        return store.write_bytes(content, uri)

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def run_cache_block_name(storage: StorageConfig, run: str) -> str:
    """The Prefect block name of a run's cache storage: the run's name and a hash of its location."""
    location = hashlib.sha256(f"{Store(storage).root}\n{run}".encode("utf-8")).hexdigest()[:12]
    return f"metareward-{_slug(run)[:40]}-{location}"


def ensure_run_cache_storage(storage: StorageConfig, run: str) -> str:
    """Save the run's `RunCacheStorage` block on the Prefect API (overwriting an older copy) and
    return its slug, for `task.with_options(result_storage=...)`. Prefect only accepts saved blocks
    as a task's result storage; the block holds no secret (see the class)."""
    name = run_cache_block_name(storage, run)
    RunCacheStorage(storage=storage, run=run).save(name, overwrite=True)
    return f"{RunCacheStorage.get_block_type_slug()}/{name}"

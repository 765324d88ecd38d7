"""tasks.cache: the Prefect cache key of a stage is its slot and its fingerprint, and the cache records
live in the run's store, through a real Prefect API (test harness) on a local folder and on a real
S3 server (moto). What changes which fingerprint: tests/unit/test_fingerprints.py."""

from __future__ import annotations

import re

import pytest

from metareward import contract
from metareward.checkpoints import ModelRef
from metareward.config import RunConfig
from metareward.stages import ActorPairsResult, StageResult, stage_fingerprint
from metareward.summaries import ActorPairsSummary, StageSummary
from metareward.storage import StorageConfig, Store
from tasks import cache
from tasks.cache import (
    RunCacheStorage,
    StageCachePolicy,
    ensure_run_cache_storage,
    forget_other_records,
    stage_cache_key,
)

MODEL_A = ModelRef(uri="/models/a", sha256="a" * 64)
LOCAL = StorageConfig(root="/tmp/metareward-unused")


def _result(stage: str, key: str) -> StageResult:
    return StageResult(stage=stage, uri=f"/runs/t/iter-1/{stage}", key=key, summary=StageSummary())


def test_key_is_the_slot_and_the_stage_fingerprint():
    settings = RunConfig(name="Demo_run").for_iteration(1)
    key = stage_cache_key("judge", LOCAL, settings, MODEL_A, {"prompts": "p" * 64, "responses": "r" * 64})
    fingerprint = stage_fingerprint(Store(LOCAL), contract.JUDGE, contract.JudgeSettings.of(settings), MODEL_A, {"prompts": "p" * 64, "responses": "r" * 64})
    assert key == "judge-iter-1-" + fingerprint
    assert re.fullmatch(r"[a-z0-9-]+", key)
    assert stage_cache_key("sample_prompts", LOCAL, RunConfig(name="t").for_iteration(2), None, {}).startswith("sample-prompts-iter-2-")


def test_policy_keys_from_task_inputs_and_names_a_missing_config():
    settings = RunConfig(name="t").for_iteration(1)
    prompts = _result("sample_prompts", "p" * 64)
    policy = StageCachePolicy(stage="generate")
    key = policy.compute_key(None, {"storage": LOCAL, "config": settings, "model": MODEL_A, "prompts": prompts}, {})
    assert key == stage_cache_key("generate", LOCAL, settings, MODEL_A, {"prompts": prompts.key})
    with pytest.raises(TypeError, match="'config'"):
        policy.compute_key(None, {"storage": LOCAL, "model": MODEL_A}, {})
    with pytest.raises(ValueError, match="not among its declared inputs"):
        policy.compute_key(None, {"storage": LOCAL, "config": settings, "model": MODEL_A, "answers": prompts}, {})


# ---- records in the run's store, through a real Prefect API ------------------------------------


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> StorageConfig:
    if request.param == "local":
        return StorageConfig(root=str(tmp_path / "runs"))
    server = request.getfixturevalue("moto_s3")
    return server.storage_config(prefix=f"caching-{tmp_path.name}")


def test_results_are_cached_in_the_run_store_refreshed_and_forgotten(prefect_api, storage):
    from prefect import flow, task

    calls = []

    @task(cache_policy=StageCachePolicy(stage="actor_pairs"), persist_result=True)
    def select(storage: StorageConfig, config, model: ModelRef, prompts: StageResult) -> ActorPairsResult:
        calls.append(config.pairs.rho)
        return ActorPairsResult(stage="actor_pairs", uri=None, summary=ActorPairsSummary(prompts=0, pairs=0, rho=config.pairs.rho))

    @flow
    def pipeline(rho: float, refresh: bool = False):
        config = RunConfig(name="cached-run", pairs={"rho": rho}, storage=storage)
        slug = ensure_run_cache_storage(storage, config.name)
        state = select.with_options(result_storage=slug, refresh_cache=refresh)(
            storage, config.for_iteration(1), MODEL_A, _result("sample_prompts", "p" * 64), return_state=True
        )
        return state.name, state.result()

    assert pipeline(0.0)[0] == "Completed"
    name, result = pipeline(0.0)
    assert (name, result.summary.rho) == ("Cached", 0.0)
    assert pipeline(0.0, refresh=True)[0] == "Completed"
    assert pipeline(0.25)[0] == "Completed"
    assert calls == [0.0, 0.0, 0.25]

    store = Store(storage)
    records = sorted(uri.rsplit("/", 1)[-1] for uri in store.ls(cache.cache_uri(store, "cached-run")))
    assert len(records) == 2 and all(record.startswith("actor-pairs-iter-1-") for record in records)
    keep = stage_cache_key(
        "actor_pairs", storage, RunConfig(name="cached-run", pairs={"rho": 0.25}).for_iteration(1), MODEL_A, {"prompts": "p" * 64}
    )
    assert keep in records
    assert forget_other_records(store, "cached-run", "actor_pairs", 1, keep=keep) == [r for r in records if r != keep]
    assert pipeline(0.0)[0] == "Completed"  # its record was forgotten: recomputed, not a stale hit


def test_saved_block_holds_no_secret(prefect_api, moto_s3):
    storage = moto_s3.storage_config(prefix="secret-check")
    slug = ensure_run_cache_storage(storage, "secret-check")
    loaded = RunCacheStorage.load(slug.split("/", 1)[1])
    assert loaded.storage == storage
    assert moto_s3.secret not in loaded.model_dump_json()
    loaded.write_path("probe", b"x")
    assert Store(storage).read_bytes(f"{Store(storage).run_uri('secret-check')}/cache/probe") == b"x"

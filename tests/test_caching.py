"""metareward.caching: what changes a stage's cache key, and the cache records in the run's store
through a real Prefect API (test harness) on a local folder and on a real S3 server (moto)."""

from __future__ import annotations

import re

import pytest

from metareward import caching
from metareward.caching import (
    RunCacheStorage,
    StageCachePolicy,
    ensure_run_cache_storage,
    forget_other_records,
    stage_cache_key,
)
from metareward.checkpoints import ModelRef
from metareward.config import RunConfig
from metareward.stages import StageResult
from metareward.storage import StorageConfig, Store

MODEL_A = ModelRef(uri="/models/a", sha256="a" * 64)
MODEL_B = ModelRef(uri="/models/b", sha256="b" * 64)
MODEL_STAGES = ("generate", "judge", "meta_judge")


def _result(stage: str, key: str) -> StageResult:
    return StageResult(stage=stage, uri=f"/runs/t/iter-1/{stage}", key=key)


def _keys(config: RunConfig, model: ModelRef) -> dict[str, str]:
    settings = config.for_iteration(1)
    upstream = {"prompts": _result("sample_prompts", "p" * 64)}
    return {stage: stage_cache_key(stage, settings, model, upstream) for stage in (*MODEL_STAGES, "actor_pairs", "train")}


def test_key_is_stable_readable_and_names_stage_iteration_and_checkpoint():
    config = RunConfig(name="Demo_run")
    key = _keys(config, MODEL_A)["judge"]
    assert key == _keys(RunConfig(name="Demo_run"), MODEL_A)["judge"]
    assert key.startswith("judge-iter-1-" + "a" * 16 + "-")
    assert re.fullmatch(r"[a-z0-9-]+", key)
    assert stage_cache_key("sample_prompts", config.for_iteration(2), None, {}).startswith("sample-prompts-iter-2-nomodel-")


def test_changing_rho_changes_only_pair_selection_keys():
    base = _keys(RunConfig(name="t"), MODEL_A)
    changed = _keys(RunConfig(name="t", pairs={"rho": 0.3}), MODEL_A)
    assert {stage for stage in base if base[stage] != changed[stage]} == {"actor_pairs"}


def test_new_checkpoint_changes_every_model_stage_key():
    before, after = _keys(RunConfig(name="t"), MODEL_A), _keys(RunConfig(name="t"), MODEL_B)
    assert all(before[stage] != after[stage] for stage in before)


def test_upstream_key_and_pipeline_version_are_part_of_the_key(monkeypatch):
    settings = RunConfig(name="t").for_iteration(1)
    one = stage_cache_key("generate", settings, MODEL_A, {"prompts": "k1"})
    assert one != stage_cache_key("generate", settings, MODEL_A, {"prompts": "k2"})
    monkeypatch.setattr(caching, "PIPELINE_VERSION", "metareward-pipeline-test")
    assert one != stage_cache_key("generate", settings, MODEL_A, {"prompts": "k1"})


def test_policy_keys_from_task_inputs_and_names_a_missing_config():
    settings = RunConfig(name="t").for_iteration(1)
    prompts = _result("sample_prompts", "p" * 64)
    policy = StageCachePolicy(stage="generate")
    key = policy.compute_key(None, {"storage": StorageConfig(), "config": settings, "model": MODEL_A, "prompts": prompts}, {})
    assert key == stage_cache_key("generate", settings, MODEL_A, {"prompts": prompts.key})
    with pytest.raises(TypeError, match="'config'"):
        policy.compute_key(None, {"model": MODEL_A}, {})


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
    def select(storage: StorageConfig, config, model: ModelRef, prompts: StageResult) -> StageResult:
        calls.append(config.pairs.rho)
        return StageResult(stage="actor_pairs", uri=None, summary={"rho": config.pairs.rho})

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
    assert (name, result.summary) == ("Cached", {"rho": 0.0})
    assert pipeline(0.0, refresh=True)[0] == "Completed"
    assert pipeline(0.25)[0] == "Completed"
    assert calls == [0.0, 0.0, 0.25]

    store = Store(storage)
    records = sorted(uri.rsplit("/", 1)[-1] for uri in store.ls(caching.cache_uri(store, "cached-run")))
    assert len(records) == 2 and all(record.startswith("actor-pairs-iter-1-" + "a" * 16) for record in records)
    keep = stage_cache_key(
        "actor_pairs", RunConfig(name="cached-run", pairs={"rho": 0.25}).for_iteration(1), MODEL_A, {"prompts": "p" * 64}
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

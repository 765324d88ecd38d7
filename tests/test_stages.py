"""The plain stage functions on the real embedded model, local storage and real Parquet.

One tiny iteration (3 prompts, K=3, N=2, 24 tokens per text, forced verdicts, shards of 2 prompts)
is run once per module and shared by the checks of its artifacts; the other model tests reuse its
artifacts as inputs. Tests without `@pytest.mark.model` load no model.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.fixtures import stage_calls as stages
from metareward.config import parse_config
from metareward.engines import release_engines
from metareward.parsing import parse_score
from metareward.schema import (
    ELO_COLUMNS,
    JUDGMENTS_COLUMNS,
    META_JUDGMENTS_COLUMNS,
    META_TARGETS_COLUMNS,
    PAIRS_COLUMNS,
    PROMPTS_COLUMNS,
    RESPONSES_COLUMNS,
    SCHEMA_VERSION,
    SCORES_COLUMNS,
)
from metareward.storage import ArtifactInfo, StorageConfig, Store, is_complete, read_artifact, read_manifest, write_artifact

K, N = 3, 2
TINY = {
    "name": "stages-test",
    "seed": 7,
    "max_iterations": 2,
    "prompts": {"per_iteration": 3, "holdout_fraction": 0.1},
    "actor": {"k": K, "max_tokens": 24},
    "judge": {"n": N, "max_tokens": 24},
    "meta_judge": {"max_tokens": 24},
    "verdict_mode": "forced",
    "shard_size": 2,
    "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
    "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 768},
}


def tiny_config(root: Path, **changes):
    data = {**TINY, "storage": {"root": str(root)}, **changes}
    return parse_config(data, source="tiny test config")


class Interrupted(Exception):
    """Raised from a progress callback to stop a stage after its first shard, as a kill would."""


def stop_after_first_shard(fraction: float) -> None:
    if 0 < fraction < 1:
        raise Interrupted(f"stopped at {fraction:.2f}")


# ----------------------------------------------------------------------------------------------
# one shared tiny iteration


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, seed_ref):
    root = tmp_path_factory.mktemp("stages-run")
    run_config = tiny_config(root)
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    progress: list[float] = []
    results = {}
    results["sample_prompts"] = stages.sample_prompts(store, config)
    prompts_uri = results["sample_prompts"].uri
    results["generate"] = stages.generate(store, config, seed_ref, prompts_uri, progress=progress.append)
    responses_uri = results["generate"].uri
    results["judge"] = stages.judge(store, config, seed_ref, prompts_uri, responses_uri)
    judgments_uri = results["judge"].uri
    results["meta_judge"] = stages.meta_judge(store, config, seed_ref, prompts_uri, responses_uri, judgments_uri)
    results["actor_pairs"] = stages.actor_pairs(store, config, prompts_uri, responses_uri, results["judge"].uris["scores"])
    results["judge_pairs"] = stages.judge_pairs(
        store,
        config,
        prompts_uri,
        responses_uri,
        judgments_uri,
        results["meta_judge"].uris["meta_targets"],
        results["meta_judge"].uri,
    )
    tables = {
        name: read_artifact(store, uri)
        for result in results.values()
        for name, uri in result.uris.items()
    }
    return {"store": store, "config": config, "run_config": run_config, "results": results, "tables": tables, "progress": progress}


@pytest.mark.model
def test_every_artifact_has_the_documented_columns_and_a_manifest(tiny_run):
    store, results, tables = tiny_run["store"], tiny_run["results"], tiny_run["tables"]
    expected = {
        "prompts": PROMPTS_COLUMNS,
        "responses": RESPONSES_COLUMNS,
        "judgments": JUDGMENTS_COLUMNS,
        "scores": SCORES_COLUMNS,
        "meta_targets": META_TARGETS_COLUMNS,
        "meta_judgments": META_JUDGMENTS_COLUMNS,
        "actor_pairs": PAIRS_COLUMNS,
        "elo": ELO_COLUMNS,
        "judge_pairs": PAIRS_COLUMNS,
    }
    assert set(tables) == set(expected)
    for name, columns in expected.items():
        assert list(tables[name].columns) == list(columns), name
    for result in results.values():
        for name, uri in result.uris.items():
            assert uri == store.stage_uri("stages-test", 1, name)
            manifest = read_manifest(store, uri)
            assert manifest["rows"] == len(tables[name])
            assert manifest["schema_version"] == SCHEMA_VERSION
            assert manifest["stage"] == result.stage
        assert read_manifest(store, result.uri)["fingerprint"] == result.key
    # Sharded artifacts: 3 prompts in shards of 2, shards folder gone once finalized.
    for name in ("responses", "judgments", "meta_judgments"):
        manifest = read_manifest(store, store.stage_uri("stages-test", 1, name))
        assert manifest["shard_count"] == 2
        assert not store.exists(store.join(store.stage_uri("stages-test", 1, name), "shards"))
    assert tiny_run["progress"][0] == 0.0 and tiny_run["progress"][-1] == 1.0 and len(tiny_run["progress"]) == 3


@pytest.mark.model
def test_counts_are_consistent_across_the_tables(tiny_run):
    t = tiny_run["tables"]
    prompts, responses, judgments, scores = t["prompts"], t["responses"], t["judgments"], t["scores"]
    assert len(prompts) == 3 and prompts["prompt_id"].is_unique
    assert set(responses["prompt_id"]) <= set(prompts["prompt_id"])
    assert responses["response_id"].is_unique
    assert responses.groupby("prompt_id").size().between(1, K).all()
    assert all(rid.startswith("it1-") for rid in responses["response_id"])
    generated = tiny_run["results"]["generate"].summary
    assert generated.generated == 3 * K
    assert generated.responses + generated.dropped["duplicate_text"] == 3 * K

    # Every response has N judgments; every judgment is a response's.
    assert judgments["judgment_id"].is_unique
    assert set(judgments["response_id"]) == set(responses["response_id"])
    assert (judgments.groupby("response_id").size() == N).all()
    assert len(judgments) == N * len(responses)
    prompt_of = responses.set_index("response_id")["prompt_id"]
    assert (judgments["prompt_id"].to_numpy() == prompt_of.reindex(judgments["response_id"]).to_numpy()).all()
    assert sorted(scores["response_id"]) == sorted(responses["response_id"])

    # Forced mode: every verdict is valid, and a forced one ends with the score it records.
    assert set(judgments["status"]) <= {"ok", "forced"}
    assert (scores["n_valid"] == N).all()
    for text, score, status in judgments[["judgment", "score", "status"]].itertuples(index=False):
        assert parse_score(text) == score
        if status == "forced":
            assert text.endswith(f"Score: {int(score)}")
    summary = tiny_run["results"]["judge"].summary
    assert summary.statuses["ok"] + summary.statuses["forced"] == len(judgments)


@pytest.mark.model
def test_meta_judgments_and_pairs_reference_existing_rows(tiny_run):
    t = tiny_run["tables"]
    judgments, responses = t["judgments"], t["responses"]
    targets, meta_judgments = t["meta_targets"], t["meta_judgments"]
    assert targets["prompt_id"].is_unique
    assert set(targets["response_id"]) <= set(responses["response_id"])
    judgment_response = judgments.set_index("judgment_id")["response_id"]
    for column in ("judgment_a_id", "judgment_b_id"):
        assert (judgment_response.reindex(meta_judgments[column]).to_numpy() == meta_judgments["response_id"].to_numpy()).all()
    assert set(meta_judgments["response_id"]) == set(targets["response_id"])
    # Both orders of every pair of the target's N valid judgments.
    assert (meta_judgments.groupby("response_id").size() == N * (N - 1)).all()
    assert set(meta_judgments["status"]) <= {"ok", "forced"}
    assert meta_judgments["winner"].isin(["A", "B"]).all()
    summary = tiny_run["results"]["meta_judge"].summary
    assert summary.win_1st + summary.win_2nd == len(meta_judgments)

    actor = t["actor_pairs"]
    assert set(actor["kind"]) <= {"actor"}
    response_text = responses.set_index("response_id")["response"]
    response_prompt = responses.set_index("response_id")["prompt_id"]
    for side in ("chosen", "rejected"):
        assert (response_text.reindex(actor[f"{side}_id"]).to_numpy() == actor[side].to_numpy()).all()
        assert (response_prompt.reindex(actor[f"{side}_id"]).to_numpy() == actor["prompt_id"].to_numpy()).all()
    assert (actor["chosen_score"] > actor["rejected_score"]).all()
    actor_summary = tiny_run["results"]["actor_pairs"].summary
    assert actor_summary.pairs + sum(actor_summary.dropped.values()) == responses["prompt_id"].nunique()

    judge = t["judge_pairs"]
    judgment_text = judgments.set_index("judgment_id")["judgment"]
    target_of_prompt = targets.set_index("prompt_id")["response_id"]
    for side in ("chosen", "rejected"):
        assert (judgment_text.reindex(judge[f"{side}_id"]).to_numpy() == judge[side].to_numpy()).all()
        assert (
            judgment_response.reindex(judge[f"{side}_id"]).to_numpy() == target_of_prompt.reindex(judge["prompt_id"]).to_numpy()
        ).all()
    assert set(t["elo"]["judgment_id"]) <= set(judgments["judgment_id"])
    assert (judge["chosen_elo"] > judge["rejected_elo"]).all()
    judge_summary = tiny_run["results"]["judge_pairs"].summary
    assert judge_summary.pairs + sum(judge_summary.dropped.values()) == len(targets)
    assert math.isclose(judge_summary.w1 + judge_summary.w2, 1.0)


@pytest.mark.model
def test_train_and_summary_produce_the_next_checkpoint(tiny_run, seed_ref):
    store, config, results = tiny_run["store"], tiny_run["config"], tiny_run["results"]
    actor_uri, judge_uri = results["actor_pairs"].uri, results["judge_pairs"].uri
    n_pairs = len(tiny_run["tables"]["actor_pairs"]) + len(tiny_run["tables"]["judge_pairs"])
    assert n_pairs > 0, "the tiny run produced no pair at all; nothing to train"
    trained = stages.train(store, config, seed_ref, actor_uri, judge_uri)
    assert trained.model is not None and trained.model.sha256 != seed_ref.sha256
    assert trained.model.uri == store.checkpoint_uri("stages-test", 1)
    assert trained.summary.trained is True and trained.summary.pairs == n_pairs
    assert trained.summary.steps == 1
    metrics = read_artifact(store, trained.uri)
    assert len(metrics) == 1 and "loss" in metrics.columns

    overview = stages.summary(store, config, seed_ref, [*results.values(), trained])
    table = read_artifact(store, overview.uri)
    assert list(table["stage"]) == [*results, "train", "summary"]
    assert overview.summary.responses == len(tiny_run["tables"]["responses"])
    assert overview.summary.judgments == len(tiny_run["tables"]["judgments"])
    assert overview.summary.model == trained.model and overview.summary.base == seed_ref


# ----------------------------------------------------------------------------------------------
# resuming, duplicates, what the judge parses


@pytest.mark.model
def test_a_judge_stage_stopped_after_one_shard_resumes_to_the_same_table(tiny_run, tmp_path, seed_ref):
    source = tiny_run["store"]
    config = tiny_run["config"]
    store = Store(StorageConfig(root=str(tmp_path)))
    # The same upstream artifacts, copied as they are (manifests and fingerprints included).
    for name in ("prompts", "responses"):
        shutil.copytree(source.stage_uri("stages-test", 1, name), store.stage_uri("stages-test", 1, name))
    prompts_uri = store.stage_uri("stages-test", 1, "prompts")
    responses_uri = store.stage_uri("stages-test", 1, "responses")
    judgments_uri = store.stage_uri("stages-test", 1, "judgments")

    with pytest.raises(Interrupted):
        stages.judge(store, config, seed_ref, prompts_uri, responses_uri, progress=stop_after_first_shard)
    assert not is_complete(store, judgments_uri)
    shard_files = [uri.rsplit("/", 1)[-1] for uri in store.ls(store.join(judgments_uri, "shards"))]
    assert sorted(shard_files) == ["plan.json", "shard-00000.parquet"]

    # A fresh engine, as a resumed process has: its prefix cache is cold where the uninterrupted run's
    # was warm (the rubric read by earlier shards), and the table must not change with it.
    release_engines()
    resumed = stages.judge(store, config, seed_ref, prompts_uri, responses_uri)
    assert resumed.summary.shards_computed == 1
    assert resumed.key == tiny_run["results"]["judge"].key
    pd.testing.assert_frame_equal(read_artifact(store, judgments_uri), tiny_run["tables"]["judgments"])
    pd.testing.assert_frame_equal(read_artifact(store, resumed.uris["scores"]), tiny_run["tables"]["scores"])

    # A complete artifact is not recomputed (and no shard is).
    again = stages.judge(store, config, seed_ref, prompts_uri, responses_uri)
    assert again.summary.shards_computed == 0


@pytest.mark.model
def test_a_new_pipeline_version_reuses_no_shard_and_no_artifact_of_the_old(tiny_run, tmp_path, seed_ref, monkeypatch):
    from metareward import contract

    source, config = tiny_run["store"], tiny_run["config"]
    killed, finished = Store(StorageConfig(root=str(tmp_path / "killed"))), Store(StorageConfig(root=str(tmp_path / "finished")))
    for store, names in ((killed, ("prompts", "responses")), (finished, ("prompts", "responses", "judgments", "scores"))):
        for name in names:
            shutil.copytree(source.stage_uri("stages-test", 1, name), store.stage_uri("stages-test", 1, name))
    uris = [killed.stage_uri("stages-test", 1, name) for name in ("prompts", "responses")]
    with pytest.raises(Interrupted):  # one shard committed under the old version
        stages.judge(killed, config, seed_ref, *uris, progress=stop_after_first_shard)

    monkeypatch.setattr(contract, "PIPELINE_VERSION", "metareward-pipeline-next")
    for store in (killed, finished):
        rerun = stages.judge(store, config, seed_ref, *(store.stage_uri("stages-test", 1, name) for name in ("prompts", "responses")))
        assert rerun.summary.shards_computed == rerun.summary.shards  # nothing of the old version reused
        assert rerun.key != tiny_run["results"]["judge"].key
        assert read_manifest(store, rerun.uri)["pipeline_version"] == "metareward-pipeline-next"


@pytest.mark.model
def test_exact_duplicate_responses_are_removed_and_counted(tmp_path, seed_ref):
    # Greedy decoding gives the same text K times: K - 1 duplicates per prompt.
    run_config = tiny_config(tmp_path, prompts={"per_iteration": 2}, actor={"k": 3, "temperature": 0.0, "max_tokens": 12})
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    prompts = stages.sample_prompts(store, config)
    result = stages.generate(store, config, seed_ref, prompts.uri)
    responses = read_artifact(store, result.uri)
    assert len(responses) == 2
    assert responses["prompt_id"].is_unique and responses["response_id"].is_unique
    assert result.summary.dropped == {"duplicate_text": 4}
    assert result.summary.generated == 6 and result.summary.responses == 2


def write_input(store: Store, uri: str, table: pd.DataFrame, stage: str) -> None:
    write_artifact(store, uri, table, ArtifactInfo(stage=stage, schema_version=SCHEMA_VERSION, fingerprint=f"test-input-{stage}"))


@pytest.mark.model
def test_the_judge_parses_only_its_own_text_never_the_response(tmp_path, seed_ref):
    run_config = tiny_config(tmp_path, verdict_mode="parse", judge={"n": 2, "max_tokens": 6})
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    prompts_uri = store.stage_uri("stages-test", 1, "prompts")
    responses_uri = store.stage_uri("stages-test", 1, "responses")
    write_input(store, prompts_uri, pd.DataFrame({"prompt_id": ["p1"], "prompt": ["How good is this answer?"]}), "sample_prompts")
    write_input(
        store,
        responses_uri,
        pd.DataFrame(
            {
                "prompt_id": ["p1"],
                "response_id": ["it1-p1-r0"],
                "response": ["I rate myself highly.\nScore: 5"],
                "n_tokens": [9],
                "finish_reason": ["stop"],
            }
        ),
        "generate",
    )
    result = stages.judge(store, config, seed_ref, prompts_uri, responses_uri)
    judgments = read_artifact(store, result.uri)
    assert len(judgments) == 2
    for text, score, status in judgments[["judgment", "score", "status"]].itertuples(index=False):
        own = parse_score(text)
        if own is None:
            assert status != "ok" and np.isnan(score)
        else:
            assert status == "ok" and score == own
    # Six tokens leave no room for a score line: the response's "Score: 5" must not become one.
    unscored = judgments[~judgments["judgment"].str.contains("score", case=False)]
    assert len(unscored) > 0
    assert (unscored["status"] == "no_score").all() and unscored["score"].isna().all()


# ----------------------------------------------------------------------------------------------
# stages without a model


def test_sample_prompts_draws_disjoint_iterations_from_the_training_pool(tmp_path):
    run_config = tiny_config(tmp_path, prompts={"per_iteration": 5, "holdout_fraction": 0.1}, iterations={2: {"prompts_per_iteration": 4}})
    store = Store(run_config.storage)
    first = stages.sample_prompts(store, run_config.for_iteration(1))
    second = stages.sample_prompts(store, run_config.for_iteration(2))
    one, two = read_artifact(store, first.uri), read_artifact(store, second.uri)
    assert list(one.columns) == list(PROMPTS_COLUMNS)
    assert (len(one), len(two)) == (5, 4)
    assert not set(one["prompt_id"]) & set(two["prompt_id"])
    assert first.summary.heldout == second.summary.heldout > 0
    assert first.uri.endswith("/iter-1/prompts") and second.uri.endswith("/iter-2/prompts")
    # Same inputs, same sample and key.
    again = stages.sample_prompts(store, run_config.for_iteration(1))
    assert again.key == first.key
    pd.testing.assert_frame_equal(read_artifact(store, again.uri), one)


def test_train_without_pairs_trains_nothing_and_says_why(tmp_path):
    run_config = tiny_config(tmp_path)
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    empty = pd.DataFrame({column: pd.Series(dtype="float64" if column.endswith(("_score", "_elo")) else "str") for column in PAIRS_COLUMNS})
    actor_uri = store.stage_uri("stages-test", 1, "actor_pairs")
    write_input(store, actor_uri, empty, "actor_pairs")
    # No model is needed: a ModelRef that points nowhere proves nothing is loaded.
    from metareward.checkpoints import ModelRef

    nowhere = ModelRef(uri=str(tmp_path / "no-model-here"), sha256="0" * 64)
    seen: list[float] = []
    result = stages.train(store, config, nowhere, actor_uri, None, progress=seen.append)
    assert result.model is None and result.uri is None
    assert result.summary.trained is False and result.summary.pairs == 0
    assert "no preference pairs" in result.summary.message and "stops" in result.summary.message
    assert not store.exists(store.checkpoint_uri("stages-test", 1))
    assert seen == [1.0]


@pytest.mark.model
def test_train_whose_pairs_are_all_dropped_trains_nothing_and_says_why(tmp_path, seed_ref):
    run_config = tiny_config(tmp_path)
    config = run_config.for_iteration(1)
    store = Store(run_config.storage)
    # chosen == rejected: the training input rules drop both pairs as 'identical'.
    pairs = pd.DataFrame(
        {
            "kind": ["actor", "actor"],
            "prompt_id": ["p1", "p2"],
            "prompt": ["Name a colour.", "Name a fruit."],
            "chosen": ["Blue.", "Apple."],
            "rejected": ["Blue.", "Apple."],
            "chosen_id": ["it1-p1-r0", "it1-p2-r0"],
            "rejected_id": ["it1-p1-r1", "it1-p2-r1"],
            "chosen_score": [4.0, 3.0],
            "rejected_score": [1.0, 2.0],
            "chosen_chars": [5, 6],
            "rejected_chars": [5, 6],
            "chosen_elo": [np.nan, np.nan],
            "rejected_elo": [np.nan, np.nan],
        }
    )
    actor_uri = store.stage_uri("stages-test", 1, "actor_pairs")
    write_input(store, actor_uri, pairs, "actor_pairs")
    result = stages.train(store, config, seed_ref, actor_uri, None)
    assert result.model is None and result.uri is None
    assert result.summary.trained is False and result.summary.pairs == 2
    assert result.summary.dropped["identical"] == 2
    assert "dropped every one" in result.summary.message and "stops" in result.summary.message
    assert not store.exists(store.checkpoint_uri("stages-test", 1))

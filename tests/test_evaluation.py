"""The evaluation with real parts: the shipped preference set and users' files, the held-out check on
real artifacts in a local store, and the evaluation flow end to end on the embedded model through a
real Prefect API (at the end of a real iteration, on its own, and through `metareward evaluate`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from metareward import evaluation
from tests.fixtures import stage_calls
from metareward.config import RunConfig
from metareward.evaluation import HeldOutOverlapError, PreferenceSetError, heldout_eval_prompts, load_preference_set
from metareward.prompt_sources import heldout_prompts, load_prompt_pool
from metareward.storage import ArtifactInfo, StorageConfig, Store, read_artifact, read_manifest, write_artifact


def test_the_shipped_preference_set_has_at_least_50_plainly_ordered_pairs():
    pairs = load_preference_set("embedded")
    assert len(pairs) >= 50 and pairs["pair_id"].is_unique and pairs["prompt"].is_unique
    assert (pairs["chosen"] != pairs["rejected"]).all()
    for column in ("prompt", "chosen", "rejected"):
        assert pairs[column].map(lambda text: isinstance(text, str) and text.strip() != "").all()
    counts = pairs["kind"].value_counts()
    assert set(counts.index) == {"correct_vs_wrong", "on_topic_vs_off_topic", "complete_vs_truncated"}
    assert counts.min() >= 15 and pairs["category"].nunique() >= 15
    truncated = pairs[pairs["kind"] == "complete_vs_truncated"]
    assert (truncated["rejected"].str.len() < truncated["chosen"].str.len()).all()
    assert all(chosen.startswith(rejected) for chosen, rejected in zip(truncated["chosen"], truncated["rejected"]))


def test_a_users_preference_set_loads_from_jsonl_and_parquet_and_bad_files_are_refused(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"}]
    pd.DataFrame(rows).to_json(tmp_path / "prefs.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).assign(pair_id=["a", "b"]).to_parquet(tmp_path / "prefs.parquet")
    from_jsonl = load_preference_set(str(tmp_path / "prefs.jsonl"))
    from_parquet = load_preference_set(str(tmp_path / "prefs.parquet"))
    assert list(from_jsonl.columns[:4]) == ["pair_id", "prompt", "chosen", "rejected"] and from_jsonl["pair_id"].is_unique
    assert from_parquet["pair_id"].tolist() == ["a", "b"] and from_parquet["chosen"].tolist() == ["4", "Paris"]

    pd.DataFrame([{"prompt": "x", "chosen": "same", "rejected": "same"}]).to_json(tmp_path / "same.jsonl", orient="records", lines=True)
    pd.DataFrame([{"prompt": "x", "better": "a", "rejected": "b"}]).to_json(tmp_path / "column.jsonl", orient="records", lines=True)
    pd.DataFrame([{"prompt": "x", "chosen": " ", "rejected": "b"}]).to_json(tmp_path / "empty.jsonl", orient="records", lines=True)
    for name, message in [
        ("same.jsonl", r"the same text at row 1 \(line 1\)"),
        ("column.jsonl", "missing column.*chosen"),
        ("empty.jsonl", r"column 'chosen' empty or not text at row 1 \(line 1\)"),
        ("missing.jsonl", "does not exist"),
        ("prefs.csv", "unsupported extension"),
    ]:
        with pytest.raises(PreferenceSetError, match=message):
            load_preference_set(str(tmp_path / name))


def test_heldout_prompts_are_refused_once_an_iteration_sampled_one_for_training(tmp_path):
    config = RunConfig(name="heldout", storage=StorageConfig(root=str(tmp_path)), prompts={"per_iteration": 5})
    store = Store(config.storage)
    stage_calls.sample_prompts(store, config.for_iteration(1))  # the real sampling never touches the held-out slice
    prompts = heldout_eval_prompts(store, config)
    pool = load_prompt_pool("embedded")
    assert prompts.equals(heldout_prompts(pool, config.seed, config.prompts.holdout_fraction))
    assert len(prompts) == 15  # ceil(0.1 x 141)

    # An iteration sampled under other settings holds a held-out prompt: evaluation must refuse.
    leaked = pd.concat([read_artifact(store, store.stage_uri("heldout", 1, "prompts")), prompts.iloc[[3]]], ignore_index=True)
    info = ArtifactInfo(stage="sample_prompts", schema_version=1, fingerprint="leaked")
    write_artifact(store, store.stage_uri("heldout", 2, "prompts"), leaked, info)
    with pytest.raises(HeldOutOverlapError, match=f"iteration 2: 1 prompt\\(s\\) \\({prompts['prompt_id'][3]}\\)"):
        heldout_eval_prompts(store, config)
    with pytest.raises(ValueError, match="holdout_fraction"):
        heldout_eval_prompts(store, config.model_copy(update={"prompts": config.prompts.model_copy(update={"holdout_fraction": 0.0})}))


HELDOUT, PAIRS = 2, 2


def _tiny_config(root: Path, model_dir: Path) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "evaluated",
            "max_iterations": 1,
            "model": str(model_dir),
            "storage": {"root": str(root)},
            "engine": {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 16},
            "prompts": {"per_iteration": 3},
            "actor": {"k": 3, "max_tokens": 16},
            "judge": {"n": 2, "max_tokens": 16},
            "verdict_mode": "forced",
            "pairs": {"train_judge_pairs": False},
            "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 1024},
            "evaluation": {
                "at_end_of_iteration": True,
                "max_prompts": HELDOUT,
                "max_tokens": 8,
                "judge_max_tokens": 8,
                "max_pairs": PAIRS,
                "bootstrap_samples": 50,
            },
        }
    )


@pytest.mark.model
def test_evaluation_runs_at_the_end_of_an_iteration_then_on_its_own_and_from_the_command_line(prefect_api, seed_ref, seed_dir, tmp_path, monkeypatch):
    from prefect.artifacts import Artifact
    from typer.testing import CliRunner

    from flows.evaluate import evaluate_flow
    from flows.iteration import iteration_flow
    from metareward.cli import app
    from metareward.engines import loaded_engines

    config = _tiny_config(tmp_path / "runs", seed_dir)
    store = Store(config.storage)
    outcome = iteration_flow(config, 1, seed_ref)
    assert outcome.model is not None, outcome.message
    assert loaded_engines() == []  # the evaluation released every model it loaded

    # Win rate: every held-out prompt in both orders, each with a verdict (forced where the 8-token text had none).
    comparisons = read_artifact(store, evaluation.evaluation_uri(store, "evaluated", 1, "comparisons"))
    assert len(comparisons) == 2 * HELDOUT and sorted(comparisons["order"]) == ["x_first", "x_first", "y_first", "y_first"]
    assert comparisons["verdict"].isin(["A", "B"]).all() and comparisons["status"].isin(["ok", "forced"]).all()
    assert set(comparisons["prompt_id"]) <= set(heldout_prompts(load_prompt_pool("embedded"), 0, 0.1)["prompt_id"])
    win = read_artifact(store, evaluation.evaluation_uri(store, "evaluated", 1, "win_rate")).iloc[0]
    assert (win["model_x_sha256"], win["model_y_sha256"], win["judge_sha256"]) == (outcome.model.sha256, seed_ref.sha256, seed_ref.sha256)
    assert win["decided"] == 2 * HELDOUT and win["x_wins"] + win["y_wins"] == 2 * HELDOUT
    assert win["win_rate"] == pytest.approx(win["x_wins"] / (2 * HELDOUT))
    assert win["lc_low"] <= win["lc_win_rate"] <= win["lc_high"]

    # Judge accuracy: M1 and M0 each judged both sides of every pair, with a verdict for each.
    accuracy = read_artifact(store, evaluation.evaluation_uri(store, "evaluated", 1, "judge_accuracy"))
    assert sorted(accuracy["role"]) == ["x", "y"] and (accuracy["pairs"] == PAIRS).all()
    assert (accuracy["scored_pairs"] == PAIRS).all()
    assert ((accuracy["correct"] + accuracy["wrong"] + accuracy["ties"]) == PAIRS).all()
    judgments = read_artifact(store, evaluation.evaluation_uri(store, "evaluated", 1, "preference_judgments_x"))
    assert len(judgments) == 2 * PAIRS and judgments["status"].isin(["ok", "forced"]).all()
    markdown = Artifact.get("evaluated-iter-1-evaluation-summary")
    assert markdown is not None and "length-controlled win rate" in markdown.data and "Judge accuracy" in markdown.data

    # On its own, for the newest iteration: the same inputs reuse what storage holds (nothing recomputed).
    written = {name: read_manifest(store, evaluation.evaluation_uri(store, "evaluated", 1, name))["created_at"] for name in ("comparisons", "responses_x", "preference_judgments_y")}
    again = evaluate_flow(config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"at_end_of_iteration": False})}))
    assert again.models.iteration == 1 and again.models.model_x == outcome.model
    assert again.win_rate["win_rate"] == win["win_rate"] and again.win_rate["lc_win_rate"] == pytest.approx(win["lc_win_rate"])
    for name, created in written.items():
        assert read_manifest(store, evaluation.evaluation_uri(store, "evaluated", 1, name))["created_at"] == created, name

    config_file = tmp_path / "evaluated.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["evaluate", str(config_file), "--iteration", "1"])
    assert result.exit_code == 0, result.output
    assert "Win rate of X against Y" in result.output and "Judge accuracy" in result.output
    missing = CliRunner().invoke(app, ["evaluate", str(config_file), "--iteration", "2"])
    assert missing.exit_code == 1 and "iteration 2 of run evaluated has no trained checkpoint" in missing.output

    # A new pipeline version: every evaluation artifact is computed again, none reused.
    from metareward import contract

    names = ("responses_x", "responses_y", "comparisons", "win_rate", "preference_judgments_x", "preference_judgments_y", "judge_accuracy")
    old = {name: read_manifest(store, evaluation.evaluation_uri(store, "evaluated", 1, name))["fingerprint"] for name in names}
    monkeypatch.setattr(contract, "PIPELINE_VERSION", "metareward-pipeline-next")
    assert CliRunner().invoke(app, ["evaluate", str(config_file), "--iteration", "1"]).exit_code == 0
    for name in names:
        manifest = read_manifest(store, evaluation.evaluation_uri(store, "evaluated", 1, name))
        assert manifest["pipeline_version"] == "metareward-pipeline-next" and manifest["fingerprint"] != old[name], name


def test_the_evaluate_flow_takes_the_run_config_model_so_the_ui_renders_a_form():
    from prefect.utilities.callables import parameter_schema

    from flows.evaluate import evaluate_flow

    schema = parameter_schema(evaluate_flow.fn).model_dump_for_openapi()
    assert schema["properties"]["config"]["$ref"].endswith("/RunConfig")
    assert {"RunConfig", "EvaluationConfig", "ModelRef"} <= set(schema["definitions"])
    assert schema["required"] == ["config"]

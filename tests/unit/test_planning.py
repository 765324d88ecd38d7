"""The cost model (`metareward.planning`): counts of the paper's schedule, the meta-judge's count
against the real comparison plan, hours against GPUs, and lengths measured on stored iterations."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from metareward import meta, planning
from metareward.config import RunConfig, load_config
from metareward.schema import JUDGMENT, JUDGMENTS_COLUMNS, N_TOKENS
from metareward.storage import ArtifactInfo, StorageConfig, Store, write_artifact
from tests.fixtures.iterations import hand_made_iteration, write_iteration

PAPER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper-llama3-8b.yaml"


def _config(**fields) -> RunConfig:
    return RunConfig.model_validate({"name": "plan-test", **fields})


def test_paper_schedule_counts_match_the_spec():
    config = load_config(PAPER_CONFIG)
    run_plan = planning.plan_run(config)

    assert [item.iteration for item in run_plan.iterations] == [1, 2, 3, 4]
    for item in run_plan.iterations:
        # The spec's cost at paper scale: 5,000 prompts, 35k responses, 385k judgments per iteration.
        assert (item.prompts, item.responses, item.judgments) == (5_000, 35_000, 385_000)
    # ... and up to 550k meta-judgments in iterations 1-2 (5,000 x C(11,2) x 2); none in 3-4.
    assert [item.meta_comparisons for item in run_plan.iterations] == [550_000, 550_000, 0, 0]
    assert [item.generated_tokens["meta_judge"] for item in run_plan.iterations[2:]] == [0, 0]
    assert [item.judge_pairs for item in run_plan.iterations] == [5_000, 5_000, 0, 0]
    assert run_plan.total("meta_comparisons") == 1_100_000


def test_meta_comparisons_equal_the_real_comparison_plan():
    """The planned count is what `plan_comparisons` builds when every judgment is valid and each prompt has a target."""
    prompts, k, n = 4, 3, 5
    rows = [
        (f"p{p}", f"p{p}-r{r}", f"p{p}-r{r}-j{j}", "Score: 1", float(j % 3), "ok", "stop")
        for p in range(prompts)
        for r in range(k)
        for j in range(n)
    ]
    judgments = pd.DataFrame(rows, columns=list(JUDGMENTS_COLUMNS))
    comparisons = meta.plan_comparisons(judgments, meta.select_meta_targets(judgments))

    config = _config(prompts={"per_iteration": prompts}, actor={"k": k}, judge={"n": n}, max_iterations=1)
    item = planning.plan_run(config).iterations[0]
    assert item.meta_comparisons == len(comparisons)
    assert item.judgments == len(judgments)


def test_overrides_set_prompts_and_assumed_lengths_per_iteration():
    config = _config(
        max_iterations=2,
        actor={"max_tokens": 400},
        iterations={2: {"prompts_per_iteration": 30, "actor_max_tokens": 100, "train_judge_pairs": False}},
    )
    first, second = planning.plan_run(config).iterations
    assert (first.prompts, second.prompts) == (config.prompts.per_iteration, 30)
    fraction = planning.ASSUMED_OUTPUT_FRACTION["actor"]
    assert first.lengths["actor"].tokens == fraction * 400 and second.lengths["actor"].tokens == fraction * 100
    assert second.lengths["actor"].source.startswith("assumed:")
    assert second.generated_tokens["actor"] == 30 * config.actor.k * fraction * 100
    assert second.meta_comparisons == 0 and second.judge_pairs == 0


def _ray_config(shard_size: int, per_iteration: int = 64) -> RunConfig:
    return _config(
        max_iterations=1,
        prompts={"per_iteration": per_iteration},
        shard_size=shard_size,
        execution={"backend": "ray", "ray": {"gpus_per_engine": 1, "min_shards_per_engine": 2}},
    )


def test_hours_scale_with_one_over_gpus_when_shards_fill_the_engines():
    config = _ray_config(shard_size=4)  # 16 shards
    hours = {gpus: planning.plan_run(config, gpus=gpus, tokens_per_second=1000.0).hours for gpus in (1, 2, 4, 8, 16)}
    for gpus in (2, 4, 8, 16):
        assert hours[gpus] == pytest.approx(hours[1] / gpus)

    item = planning.plan_run(config, gpus=1, tokens_per_second=1000.0, prefill_speedup=4.0).iterations[0]
    for role in planning.ROLES:
        expected = (item.generated_tokens[role] + item.prefill_tokens[role] / 4.0) / 1000.0 / 3600
        assert item.stage_hours[role] == pytest.approx(expected)


def test_a_last_wave_of_few_shards_leaves_engines_idle_and_the_advice_says_so():
    config = _ray_config(shard_size=16)  # 4 shards
    one, three, eight = (planning.plan_run(config, gpus=gpus, tokens_per_second=1000.0) for gpus in (1, 3, 8))
    # 3 engines: a wave of 3 shards, then 1 shard alone; 8 engines: 4 of them busy, one wave.
    assert [run_plan.iterations[0].waves for run_plan in (one, three, eight)] == [4, 2, 1]
    assert three.hours == pytest.approx(one.hours / 2)
    assert eight.hours == pytest.approx(one.hours / 4)
    advice = eight.iterations[0].shard_advice
    assert advice is not None and "4 shards for 8 engine(s)" in advice


def test_local_backend_runs_one_engine_and_notes_idle_gpus():
    config = _config(max_iterations=1, prompts={"per_iteration": 64}, shard_size=4)
    one = planning.plan_run(config, gpus=1, tokens_per_second=1000.0)
    four = planning.plan_run(config, gpus=4, tokens_per_second=1000.0)
    assert four.engines == 1 and four.hours == pytest.approx(one.hours)
    assert any("3 GPU(s) idle" in note for note in four.notes) and not one.notes
    assert four.iterations[0].shard_advice is None


def test_bad_numbers_name_the_option_or_key():
    config = _config()
    for kwargs, named in (
        ({"gpus": 0}, "--gpus"),
        ({"tokens_per_second": 0.0}, "--tokens-per-second"),
        ({"prefill_speedup": -1.0}, "--prefill-speedup"),
        ({"train_tokens_per_second": -5.0}, "--train-tokens-per-second"),
    ):
        with pytest.raises(planning.PlanError, match=named):
            planning.plan_run(config, **kwargs)
    two_per_engine = _config(execution={"backend": "ray", "ray": {"gpus_per_engine": 2}})
    with pytest.raises(planning.PlanError, match="execution.ray.gpus_per_engine: 2"):
        planning.plan_run(two_per_engine, gpus=1)
    cpu_engines = _config(execution={"backend": "ray", "ray": {"gpus_per_engine": 0}})
    with pytest.raises(planning.PlanError, match="gpus_per_engine is 0"):
        planning.plan_run(cpu_engines, gpus=1)


def test_dpo_pairs_tokens_and_hours():
    config = _config(max_iterations=1, prompts={"per_iteration": 100}, training={"max_judge_pairs": 30, "num_train_epochs": 2})
    item = planning.plan_run(config, tokens_per_second=1000.0, train_tokens_per_second=500.0).iterations[0]
    assert (item.actor_pairs, item.judge_pairs, item.train_examples) == (100, 30, 260)
    lengths = {kind: item.lengths[kind].tokens for kind in ("prompt", "actor", "judge")}
    judge_request = item.prefill_tokens["judge"] / item.responses  # the judge's prompt: rubric + prompt + response
    per_epoch = 100 * 2 * (lengths["prompt"] + lengths["actor"]) + 30 * 2 * (judge_request + lengths["judge"])
    assert item.train_tokens == pytest.approx(2 * per_epoch)
    assert item.train_hours == pytest.approx(item.train_tokens / 500.0 / 3600)
    assert item.hours == pytest.approx(item.generation_hours + item.train_hours)


def test_lengths_measured_on_the_newest_complete_iteration_holding_each_table(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    config = _config(storage={"root": str(tmp_path)}, max_iterations=3, prompts={"per_iteration": 10})
    first = hand_made_iteration(1, prompts=2, responses=3, judges=3)
    second = hand_made_iteration(2, prompts=3, responses=2, judges=4, winner=None)  # no meta-judge
    write_iteration(store, config.name, first)
    write_iteration(store, config.name, second)
    # An incomplete iteration 3 (no summary): its responses must not count.
    unfinished = second.tables.responses.assign(**{N_TOKENS: 1000})
    write_artifact(store, store.stage_uri(config.name, 3, "responses"), unfinished, ArtifactInfo(stage="generate", schema_version=1, fingerprint="x"))

    measured = planning.measured_lengths(store, config.name)

    responses = second.tables.responses
    assert measured["actor"].tokens == pytest.approx(responses[N_TOKENS].mean())
    assert measured["actor"].source.startswith("measured: iteration 2 responses, mean n_tokens")
    judgments = second.tables.judgments
    assert measured["judge"].tokens == pytest.approx(judgments[JUDGMENT].str.len().mean() / planning.CHARS_PER_TOKEN)
    assert "iteration 2 judgments, mean characters / 4 (no token column)" in measured["judge"].source
    meta_texts = first.tables.meta_judgments["meta_judgment"]
    assert measured["meta_judge"].tokens == pytest.approx(meta_texts.str.len().mean() / planning.CHARS_PER_TOKEN)
    assert measured["meta_judge"].source.startswith("measured: iteration 1 meta_judgments")
    assert measured["prompt"].tokens == pytest.approx(second.prompts["prompt"].str.len().mean() / planning.CHARS_PER_TOKEN)

    item = planning.plan_run(config, measured=measured).iterations[0]
    assert item.lengths["actor"] == measured["actor"]
    assert item.generated_tokens["actor"] == pytest.approx(item.responses * responses[N_TOKENS].mean())


def test_no_stored_run_measures_nothing(tmp_path):
    assert planning.measured_lengths(Store(StorageConfig(root=str(tmp_path))), "plan-test") == {}

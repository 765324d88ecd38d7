"""The run config: YAML loading, unknown keys named by path, per-iteration overrides, stage settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metareward.config import (
    ConfigError,
    IterationConfig,
    RunConfig,
    load_config,
    parse_config,
)
from metareward.contract import STAGES, settings_of, stage_named

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def write_yaml(tmp_path: Path, data: object, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_demo_config_loads_and_is_small_enough_for_the_demo():
    config = load_config(DEMO)
    assert config.name == "demo"
    assert config.max_iterations == 2
    assert config.model == "embedded"
    assert config.storage.root == "./runs"
    assert config.engine.backend == "hf" and config.engine.device == "cpu"
    assert config.verdict_mode == "forced"
    first, second = config.for_iteration(1), config.for_iteration(2)
    # Iteration 1 trains judge pairs (so the meta-judge runs), iteration 2 does not.
    assert first.pairs.train_judge_pairs is True
    assert second.pairs.train_judge_pairs is False
    # Small enough for 2 CPU cores in 15 minutes.
    assert first.prompts.per_iteration <= 12 and second.prompts.per_iteration <= first.prompts.per_iteration
    assert 3 <= first.actor.k <= 4 and first.judge.n == 3
    assert max(first.actor.max_tokens, first.judge.max_tokens, first.meta_judge.max_tokens) <= 64
    assert second.earlier_prompts_per_iteration == [first.prompts.per_iteration]


def test_unknown_key_is_named_by_its_path(tmp_path):
    path = write_yaml(tmp_path, {"name": "run-1", "judge": {"tempreature": 0.7}})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert str(path) in message
    assert "unknown key 'judge.tempreature'" in message


def test_unknown_keys_at_every_level_are_all_reported(tmp_path):
    data = {
        "name": "run-1",
        "colour": "blue",
        "training": {"lr": 1e-5},
        "iterations": {2: {"rhoo": 0.3}},
    }
    with pytest.raises(ConfigError) as raised:
        load_config(write_yaml(tmp_path, data))
    message = str(raised.value)
    for path in ("colour", "training.lr", "iterations.2.rhoo"):
        assert f"unknown key '{path}'" in message


def test_invalid_values_name_the_field_and_value(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(write_yaml(tmp_path, {"name": "run-1", "actor": {"k": 0}, "pairs": {"rho": 0.7}}))
    message = str(raised.value)
    assert "actor.k" in message and "(got 0)" in message
    assert "pairs.rho" in message and "(got 0.7)" in message


def test_run_name_is_checked(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(write_yaml(tmp_path, {"name": "../escape"}))
    assert "- name:" in str(raised.value) and "path separator" in str(raised.value)


def test_missing_file_bad_yaml_and_non_mapping_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listed)


def test_defaults_are_the_papers_settings():
    config = RunConfig(name="paper")
    assert (config.actor.k, config.actor.temperature, config.actor.top_p) == (7, 0.8, 0.95)
    assert config.judge.n == 11
    assert config.verdict_mode == "parse"
    assert config.prompts.without_replacement is True
    assert (config.pairs.max_chosen_chars, config.pairs.max_chosen_judgment_chars) == (2500, 1100)


def test_overrides_apply_only_to_their_iteration_and_fall_back_to_the_base():
    config = parse_config(
        {
            "name": "sched",
            "prompts": {"per_iteration": 20},
            "actor": {"max_tokens": 300},
            "judge": {"max_tokens": 100},
            "meta_judge": {"max_tokens": 200},
            "pairs": {"rho": 0.1, "max_chosen_chars": 2500, "max_chosen_judgment_chars": 1100},
            "iterations": {
                2: {
                    "rho": 0.32,
                    "max_chosen_chars": 0,
                    "max_chosen_judgment_chars": 1000,
                    "prompts_per_iteration": 7,
                    "verdict_mode": "forced",
                    "actor_max_tokens": 50,
                    "judge_max_tokens": 60,
                    "meta_judge_max_tokens": 70,
                },
                3: {"train_judge_pairs": False},
            },
        }
    )
    first, second, third = (config.for_iteration(i) for i in (1, 2, 3))
    assert (first.pairs.rho, first.pairs.max_chosen_chars, first.pairs.max_chosen_judgment_chars) == (0.1, 2500, 1100)
    assert (first.actor.max_tokens, first.judge.max_tokens, first.meta_judge.max_tokens) == (300, 100, 200)
    assert first.verdict_mode == "parse" and first.prompts.per_iteration == 20
    assert (second.pairs.rho, second.pairs.max_chosen_chars, second.pairs.max_chosen_judgment_chars) == (0.32, 0, 1000)
    assert (second.actor.max_tokens, second.judge.max_tokens, second.meta_judge.max_tokens) == (50, 60, 70)
    assert second.verdict_mode == "forced" and second.prompts.per_iteration == 7
    assert second.pairs.train_judge_pairs is True
    assert third.pairs.train_judge_pairs is False and third.pairs.rho == 0.1
    # Sampling without replacement needs the sizes of the earlier iterations, overrides included.
    assert third.earlier_prompts_per_iteration == [20, 7]
    # The base config is untouched by resolution.
    assert config.pairs.rho == 0.1 and config.actor.max_tokens == 300


def test_iteration_numbers_start_at_one():
    with pytest.raises(ConfigError, match="iterations"):
        parse_config({"name": "x", "iterations": {0: {"rho": 0.1}}})
    with pytest.raises(ValueError, match="iteration 1 is M0 -> M1"):
        RunConfig(name="x").for_iteration(0)


def test_stage_settings_hold_exactly_what_each_stage_reads():
    one = RunConfig(name="x").for_iteration(1)
    changed = parse_config({"name": "x", "pairs": {"rho": 0.3}}).for_iteration(1)
    # rho changes pair selection only, never generation or judging.
    assert settings_of(STAGES["actor_pairs"].settings, one) != settings_of(STAGES["actor_pairs"].settings, changed)
    for stage in ("generate", "judge", "meta_judge", "judge_pairs", "train"):
        assert settings_of(STAGES[stage].settings, one) == settings_of(STAGES[stage].settings, changed)
    judge = settings_of(STAGES["judge"].settings, one)
    assert judge.judge.n == one.judge.n and judge.verdict_mode == one.verdict_mode
    assert not hasattr(judge, "actor") and not hasattr(judge.engine, "timeout_s")  # a stage sees only its own part
    for stage in STAGES.values():
        json.dumps(settings_of(stage.settings, one).model_dump(mode="json"))  # JSON-able for manifests
    with pytest.raises(ValueError, match="unknown stage 'judging'"):
        stage_named("judging")


def test_models_round_trip_through_json_for_flow_parameters():
    config = load_config(DEMO)
    schema = RunConfig.model_json_schema()
    assert {"name", "storage", "engine", "iterations"} <= set(schema["properties"])
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    effective = config.for_iteration(2)
    assert IterationConfig.model_validate_json(effective.model_dump_json()) == effective
    # A JSON round trip turns iteration keys into strings; they come back as ints.
    reloaded = RunConfig.model_validate(json.loads(config.model_dump_json()))
    assert set(reloaded.iterations) == {1, 2}


def test_paper_config_is_the_papers_schedule():
    config = load_config(REPO / "configs" / "paper-llama3-8b.yaml")
    assert config.max_iterations == 4
    assert config.verdict_mode == "parse"
    # One 80 GB GPU: vLLM on the environment `make venv-gpu` builds, in bf16.
    assert config.engine.backend == "vllm" and config.engine.dtype == "bfloat16"
    assert config.engine.python == ".venv-gpu/bin/python"
    assert config.engine.tensor_parallel_size == 1 and config.engine.max_model_len is not None
    schedule = [config.for_iteration(i) for i in range(1, 5)]
    assert [it.pairs.rho for it in schedule] == [0.0, 0.32, 0.32, 0.4]
    assert [it.pairs.train_judge_pairs for it in schedule] == [True, True, False, False]
    assert [it.pairs.max_chosen_chars for it in schedule] == [2500, 0, 0, 0]
    assert [it.pairs.max_chosen_judgment_chars for it in schedule[:2]] == [1100, 1000]
    for it in schedule:
        assert it.prompts.per_iteration == 5000
        assert (it.actor.k, it.actor.temperature, it.actor.top_p, it.actor.dedup) == (7, 0.8, 0.95, True)
        assert it.judge.n == 11
        assert it.pairs.length_measure == "chars"
        training = it.training
        assert (training.beta, training.learning_rate, training.lr_scheduler_type) == (0.1, 5e-6, "cosine")
        global_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.num_processes
        assert global_batch == 32
        # One GPU: a LoRA merged after each iteration, reference log-probs precomputed, resumable DPO.
        assert training.lora is not None and training.precompute_ref_log_probs and training.save_steps > 0

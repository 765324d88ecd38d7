"""The stage contract: each stage of an iteration declared once, and the one fingerprint of its output.

A declaration (`Stage`) names the stage, its typed settings (`StageSettings`: exactly the fields of
the iteration's config the stage reads, projected from `IterationConfig` by `settings_of`), the
upstream stages it reads (by role), whether its output depends on the checkpoint, and the input
files whose content it reads (the prompt pool). From it `fingerprint` computes one value:

    sha256 of {stage, PIPELINE_VERSION, SCHEMA_VERSION, the settings, the checkpoint sha256 (stages
    that use one), the upstream fingerprints by role, the content digests of input files}

That value is written into every artifact manifest the stage writes, it is the Prefect cache key
(`tasks.cache`, prefixed by the artifact slot), and a complete or partly written artifact is reused
only when its manifest (or shard plan) carries the same value. So there is no second list of what a
stage reads, and bumping `PIPELINE_VERSION` changes every fingerprint: nothing computed by older code
is reused, not a cached result, not a finished artifact, not a shard.

The evaluation and the diagnostics report key their artifacts with `digest`, the same hash with the
same versions, over what they read.

Pure: no Prefect, no torch. docs/architecture.md shows one stage's path from here to its cache record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, create_model

from metareward.checks import ChecksConfig
from metareward.config import (
    ActorConfig,
    EvaluationConfig,
    IterationConfig,
    JudgeConfig,
    MetaJudgeConfig,
    PairsConfig,
    PromptsConfig,
    VerdictMode,
)
from metareward.engines.base import EngineConfig
from metareward.schema import SCHEMA_VERSION
from metareward.summaries import (
    ActorPairsSummary,
    ChecksSummary,
    GenerateSummary,
    IterationSummary,
    JudgePairsSummary,
    JudgeSummary,
    MetaJudgeSummary,
    SamplePromptsSummary,
    StageSummary,
    TrainSummary,
)
from metareward.training import TrainingConfig

# Bump when a stage's output changes meaning for the same inputs (new columns, a fixed bug in a
# rule, other sampled texts): every fingerprint changes with it, so nothing the old code computed is
# reused. Manifests record it; `metareward run` refuses a run stored under another version.
# 4: the hf engine reads shared prefixes once (its own sampling loop: other sampled texts).
# 5: the hf engine's sampler finds the top-p nucleus among the top 1,024 tokens and draws from it
#    with one uniform number per row (other sampled texts).
PIPELINE_VERSION = "metareward-pipeline-5"

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def view(model: type[BaseModel], *names: str) -> type[BaseModel]:
    """A frozen model holding only the fields `names` of `model`, with their types, defaults and
    constraints: the part of a config section a stage reads."""
    missing = [name for name in names if name not in model.model_fields]
    if missing:
        raise ValueError(f"{model.__name__} has no field(s) {missing}")
    fields = {name: (model.model_fields[name].annotation, model.model_fields[name]) for name in names}
    return create_model(f"{model.__name__}View", __config__=_FROZEN, **fields)


class StageSettings(BaseModel):
    """Base of a stage's settings: frozen, and nothing but the declared fields."""

    model_config = _FROZEN

    @classmethod
    def of(cls: type[S], config: BaseModel) -> S:
        """These settings projected from the iteration's effective config (`settings_of`)."""
        return settings_of(cls, config)


S = TypeVar("S", bound=StageSettings)


def _project(model: type[BaseModel], value: Any) -> Any:
    """`value` (a config model) reduced to the fields of `model`, recursively for nested views."""
    data = {}
    for name, field in model.model_fields.items():
        item = getattr(value, name)
        annotation = field.annotation
        is_view = isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(item, BaseModel)
        data[name] = _project(annotation, item) if is_view and not isinstance(item, annotation) else item
    return data


def settings_of(settings: type[S], config: BaseModel) -> S:
    """The settings a stage reads, projected from the iteration's effective config (the run's
    config for the evaluation's stages)."""
    return settings.model_validate(_project(settings, config))


# What of the engine changes a text: the backend, precision, batching, the hf prefix cache (its
# sampling loop is not transformers' generate) and the served model.
# Retries, timeouts, concurrency, memory shares and the API key's variable never do.
EngineOutput = view(
    EngineConfig,
    "backend",
    "device",
    "dtype",
    "trust_remote_code",
    "batch_size",
    "prefix_cache",
    "tensor_parallel_size",
    "max_model_len",
    "base_url",
    "model",
)


class SamplePromptsSettings(StageSettings):
    iteration: int
    seed: int
    prompts: PromptsConfig
    earlier_prompts_per_iteration: list[int]


class GenerateSettings(StageSettings):
    iteration: int
    seed: int
    shard_size: int
    actor: ActorConfig
    engine: EngineOutput  # type: ignore[valid-type]


class JudgeSettings(StageSettings):
    iteration: int
    seed: int
    shard_size: int
    judge: JudgeConfig
    verdict_mode: VerdictMode
    engine: EngineOutput  # type: ignore[valid-type]


class MetaJudgeSettings(StageSettings):
    iteration: int
    seed: int
    shard_size: int
    meta_judge: MetaJudgeConfig
    verdict_mode: VerdictMode
    engine: EngineOutput  # type: ignore[valid-type]


class ActorPairsSettings(StageSettings):
    iteration: int
    seed: int
    pairs: view(PairsConfig, "rho", "length_measure", "max_chosen_chars")  # type: ignore[valid-type]


class JudgePairsSettings(StageSettings):
    iteration: int
    seed: int
    pairs: view(  # type: ignore[valid-type]
        PairsConfig, "max_chosen_judgment_chars", "require_distinct_judge_scores", "elo_l2", "elo_tie_tolerance"
    )


class TrainSettings(StageSettings):
    iteration: int
    seed: int
    training: TrainingConfig


class PreTrainChecksSettings(StageSettings):
    iteration: int
    checks: view(ChecksConfig, "thresholds")  # type: ignore[valid-type]  # the gate's policy acts on the results, never changes them


class SummarySettings(StageSettings):
    iteration: int


@dataclass(frozen=True)
class Stage:
    """One stage of an iteration, declared once.

    name: the stage's name (artifact slot, task name, cache-key prefix).
    settings: the fields of the iteration's config it reads.
    inputs: the upstream stages it reads, by role (role -> stage name).
    uses_checkpoint: whether its output depends on M_{i-1} directly (not only through its inputs).
    reads_prompt_pool: whether it reads the content of `prompts.source` (digested into the fingerprint).
    reads_preference_set: likewise for `evaluation.preference_set`.
    summary: the model of what it reports (`metareward.summaries`); None for the evaluation's stages.
    """

    name: str
    settings: type[StageSettings]
    inputs: Mapping[str, str]
    uses_checkpoint: bool
    summary: type[StageSummary] | None = None
    reads_prompt_pool: bool = False
    reads_preference_set: bool = False


SAMPLE_PROMPTS = Stage(
    "sample_prompts", SamplePromptsSettings, {}, uses_checkpoint=False, reads_prompt_pool=True, summary=SamplePromptsSummary
)
GENERATE = Stage("generate", GenerateSettings, {"prompts": "sample_prompts"}, uses_checkpoint=True, summary=GenerateSummary)
JUDGE = Stage(
    "judge", JudgeSettings, {"prompts": "sample_prompts", "responses": "generate"}, uses_checkpoint=True, summary=JudgeSummary
)
META_JUDGE = Stage(
    "meta_judge",
    MetaJudgeSettings,
    {"prompts": "sample_prompts", "responses": "generate", "judgments": "judge"},
    uses_checkpoint=True,
    summary=MetaJudgeSummary,
)
ACTOR_PAIRS = Stage(
    "actor_pairs",
    ActorPairsSettings,
    {"prompts": "sample_prompts", "responses": "generate", "judgments": "judge"},
    uses_checkpoint=False,
    summary=ActorPairsSummary,
)
JUDGE_PAIRS = Stage(
    "judge_pairs",
    JudgePairsSettings,
    {"prompts": "sample_prompts", "responses": "generate", "judgments": "judge", "meta_judgments": "meta_judge"},
    uses_checkpoint=False,
    summary=JudgePairsSummary,
)
# The checks before training read what the judge and meta-judge produced and the pairs, and the
# previous iteration (score change, length growth) through its summary's fingerprint.
PRE_TRAIN_CHECKS = Stage(
    "pre_train_checks",
    PreTrainChecksSettings,
    {
        "responses": "generate",
        "judgments": "judge",
        "meta_judgments": "meta_judge",
        "actor_pairs": "actor_pairs",
        "judge_pairs": "judge_pairs",
        "previous": "summary",
    },
    uses_checkpoint=False,
    summary=ChecksSummary,
)
TRAIN = Stage(
    "train", TrainSettings, {"actor_pairs": "actor_pairs", "judge_pairs": "judge_pairs"}, uses_checkpoint=True, summary=TrainSummary
)
# The summary reads every stage's result; its upstream keys are those results' fingerprints by stage.
SUMMARY = Stage(
    "summary",
    SummarySettings,
    {
        stage.name: stage.name
        for stage in (SAMPLE_PROMPTS, GENERATE, JUDGE, META_JUDGE, ACTOR_PAIRS, JUDGE_PAIRS, PRE_TRAIN_CHECKS, TRAIN)
    },
    uses_checkpoint=True,
    summary=IterationSummary,
)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (SAMPLE_PROMPTS, GENERATE, JUDGE, META_JUDGE, ACTOR_PAIRS, JUDGE_PAIRS, PRE_TRAIN_CHECKS, TRAIN, SUMMARY)
}


# The evaluation's stages (`metareward.evaluation`), projected from the run's `RunConfig`. Each writes
# one artifact per model role under `iter-{i}/evaluation/`; the checkpoint is the model that writes it
# (the judge's for the comparisons).
class EvalResponsesSettings(StageSettings):
    seed: int  # the held-out split is the run's
    prompts: view(PromptsConfig, "holdout_fraction")  # type: ignore[valid-type]
    evaluation: view(EvaluationConfig, "max_prompts", "max_tokens", "temperature", "top_p", "seed")  # type: ignore[valid-type]
    engine: EngineOutput  # type: ignore[valid-type]


class EvalComparisonsSettings(StageSettings):
    seed: int
    prompts: view(PromptsConfig, "holdout_fraction")  # type: ignore[valid-type]
    evaluation: view(  # type: ignore[valid-type]
        EvaluationConfig, "max_prompts", "judge_engine", "judge_max_tokens", "judge_temperature", "verdict_mode", "seed"
    )
    engine: EngineOutput  # type: ignore[valid-type]  # the judge's engine unless evaluation.judge_engine is set


class EvalWinRateSettings(StageSettings):
    seed: int
    evaluation: view(EvaluationConfig, "bootstrap_samples", "confidence", "seed")  # type: ignore[valid-type]


class EvalPreferenceJudgmentsSettings(StageSettings):
    seed: int
    evaluation: view(  # type: ignore[valid-type]
        EvaluationConfig, "max_pairs", "judge_max_tokens", "judge_temperature", "verdict_mode", "seed"
    )
    engine: EngineOutput  # type: ignore[valid-type]


class EvalJudgeAccuracySettings(StageSettings):
    evaluation: view(EvaluationConfig, "preference_set")  # type: ignore[valid-type]  # a column of the table


class PostEvaluationChecksSettings(StageSettings):
    checks: view(ChecksConfig, "thresholds")  # type: ignore[valid-type]


EVAL_RESPONSES = Stage("evaluate_responses", EvalResponsesSettings, {}, uses_checkpoint=True, reads_prompt_pool=True)
EVAL_COMPARISONS = Stage(
    "evaluate_comparisons",
    EvalComparisonsSettings,
    {"responses_x": "evaluate_responses", "responses_y": "evaluate_responses"},
    uses_checkpoint=True,
    reads_prompt_pool=True,
)
EVAL_WIN_RATE = Stage("evaluate_win_rate", EvalWinRateSettings, {"comparisons": "evaluate_comparisons"}, uses_checkpoint=False)
EVAL_PREFERENCE_JUDGMENTS = Stage(
    "evaluate_preference_judgments", EvalPreferenceJudgmentsSettings, {}, uses_checkpoint=True, reads_preference_set=True
)
EVAL_JUDGE_ACCURACY = Stage(
    "evaluate_judge_accuracy",
    EvalJudgeAccuracySettings,
    {"judgments_x": "evaluate_preference_judgments", "judgments_y": "evaluate_preference_judgments"},
    uses_checkpoint=False,
)
# The checks after the evaluation (the post-evaluation gate), on M_i's win rate and judge accuracy.
POST_EVALUATION_CHECKS = Stage(
    "post_evaluation_checks",
    PostEvaluationChecksSettings,
    {"win_rate": "evaluate_win_rate", "judge_accuracy": "evaluate_judge_accuracy"},
    uses_checkpoint=False,
)

EVALUATION_STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        EVAL_RESPONSES, EVAL_COMPARISONS, EVAL_WIN_RATE, EVAL_PREFERENCE_JUDGMENTS, EVAL_JUDGE_ACCURACY, POST_EVALUATION_CHECKS
    )
}


def stage_named(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def digest(kind: str, payload: Mapping[str, Any]) -> str:
    """sha256 over a canonical JSON of `payload`, the kind of artifact and both versions: the one
    hash every fingerprint is made with."""
    body = {"kind": kind, "pipeline_version": PIPELINE_VERSION, "schema_version": SCHEMA_VERSION, **payload}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def fingerprint(
    stage: Stage,
    settings: StageSettings,
    checkpoint_sha256: str | None,
    upstream: Mapping[str, str],
    input_digests: Mapping[str, str] | None = None,
) -> str:
    """The fingerprint of `stage`'s output (see the module docstring). `upstream`: the upstream
    fingerprints by role; `input_digests`: content digests of the input files, by name."""
    if not isinstance(settings, stage.settings):
        raise TypeError(f"{stage.name}: settings must be {stage.settings.__name__}, got {type(settings).__name__}")
    unknown = sorted(set(upstream) - set(stage.inputs))
    if unknown:
        raise ValueError(f"{stage.name}: upstream role(s) {unknown} are not among its declared inputs {sorted(stage.inputs)}")
    if stage.uses_checkpoint and not checkpoint_sha256:
        raise ValueError(f"{stage.name}: its output depends on the checkpoint, so its fingerprint needs the checkpoint's sha256")
    return digest(
        f"stage/{stage.name}",
        {
            "settings": settings.model_dump(mode="json"),
            "checkpoint_sha256": checkpoint_sha256 if stage.uses_checkpoint else None,
            "upstream": dict(upstream),
            "inputs": dict(input_digests or {}),
        },
    )

"""What each stage reports, typed: the `summary` of its `StageResult`, stored as JSON in the
iteration's `summary` artifact and read back into the same models (`metareward status`, resume).

Counts are of rows; `dropped` maps a reason to the rows it removed (`docs/artifacts.md`). Pure:
pydantic only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metareward.checkpoints import ModelRef


class StageSummary(BaseModel):
    """Base of every stage's summary. Unknown keys are ignored on reading, so a summary stored by
    an older pipeline version still reads (`metareward status`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class WorkerCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    shards: int = 0
    engine_loads: int = 0


class ShardExecution(BaseModel):
    """Where a call's shards ran: shards and engine loads per worker process (`host:pid`)."""

    model_config = ConfigDict(frozen=True)

    workers: dict[str, WorkerCounts] = Field(default_factory=dict)
    engine_loads: int = 0


class ShardedSummary(StageSummary):
    """shards: the stage's shard count. shards_computed: the shards this call computed (0: every
    shard was in storage)."""

    shards: int = 0
    shards_computed: int = 0
    execution: ShardExecution = Field(default_factory=ShardExecution)


class SamplePromptsSummary(StageSummary):
    """prompts: sampled. pool: the pool's size. heldout: prompts kept for evaluation, never sampled.
    sample_pass: the pass over the pool the sample came from (without replacement; 0 = the first)."""

    prompts: int
    pool: int
    heldout: int
    sample_pass: int = 0
    source: str


class GenerateSummary(ShardedSummary):
    prompts: int
    generated: int
    responses: int
    dropped: dict[str, int] = Field(default_factory=dict)
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    mean_response_chars: float | None = None


class JudgeSummary(ShardedSummary):
    """statuses: judgments by parse status (`ok`, `forced`, ...). mean_score: over valid judgments."""

    responses: int
    judgments: int
    judgments_per_response: dict[str, int] = Field(default_factory=dict)
    statuses: dict[str, int] = Field(default_factory=dict)
    forced_fraction: float = 0.0
    mean_score: float | None = None
    responses_without_valid_score: int = 0
    finish_reasons: dict[str, int] = Field(default_factory=dict)


class MetaJudgeSummary(ShardedSummary):
    """win_1st / win_2nd: meta-judgments won by the judgment shown first / second."""

    prompts: int
    targets: int
    dropped: dict[str, int] = Field(default_factory=dict)
    comparisons: int
    meta_judgments: int
    statuses: dict[str, int] = Field(default_factory=dict)
    forced_fraction: float = 0.0
    win_1st: int = 0
    win_2nd: int = 0


class ActorPairsSummary(StageSummary):
    prompts: int
    pairs: int
    dropped: dict[str, int] = Field(default_factory=dict)
    rho: float
    mean_chosen_chars: float | None = None
    mean_rejected_chars: float | None = None


class JudgePairsSummary(StageSummary):
    """w1, w2: the positional weights; chosen_score_higher / chosen_longer: pairs whose chosen
    judgment gave the higher score / is the longer (the meta-judge's score and length bias)."""

    targets: int
    pairs: int
    dropped: dict[str, int] = Field(default_factory=dict)
    w1: float
    w2: float
    judgments_with_elo: int
    chosen_score_higher: int = 0
    chosen_longer: int = 0


class TrainSummary(StageSummary):
    """trained: whether M_i was saved (`model`); when not, `message` says why. pairs: the union of
    actor and judge pairs; pairs_used: after the training input rules and mixing."""

    trained: bool
    pairs: int
    pairs_by_kind: dict[str, int] = Field(default_factory=dict)
    message: str | None = None
    dropped: dict[str, int] = Field(default_factory=dict)
    pairs_used: int | None = None
    pairs_used_by_kind: dict[str, int] = Field(default_factory=dict)
    truncated: int | None = None
    mixing: dict[str, int] = Field(default_factory=dict)
    steps: int | None = None
    resumed_from_step: int | None = None
    processes: int | None = None
    precision: str | None = None
    train_seconds: float | None = None
    final_loss: float | None = None
    model: ModelRef | None = None
    adapter: ModelRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _stored_by_pipeline_2(cls, data: Any) -> Any:
        # Pipeline version 2 stored M_i as two strings; `metareward status` still reads such runs.
        if isinstance(data, dict) and "checkpoint" in data and "model" not in data:
            data = dict(data)
            if data.get("checkpoint"):
                data["model"] = {"uri": data["checkpoint"], "sha256": data["checkpoint_sha256"]}
            if data.get("adapter"):
                data["adapter"] = {"uri": data["adapter"], "sha256": data["adapter_sha256"]}
        return data


class ChecksSummary(StageSummary):
    """A gate's checks: their names by result (`metareward.checks`; the table holds each value).
    passed: no check failed."""

    gate: str
    passed: bool
    failed: list[str] = Field(default_factory=list)
    warned: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    checks: int = 0


class IterationSummary(StageSummary):
    """The iteration at a glance: its base M_{i-1}, M_i (None when it trained nothing) and the key
    counts of its stages (None for a stage that did not run)."""

    iteration: int
    base: ModelRef
    model: ModelRef | None = None
    prompts: int | None = None
    responses: int | None = None
    duplicates_removed: int | None = None
    judgments: int | None = None
    judgments_forced: int | None = None
    mean_score: float | None = None
    meta_judgments: int | None = None
    meta_judgments_forced: int | None = None
    actor_pairs: int | None = None
    judge_pairs: int | None = None
    trained: bool = False
    final_loss: float | None = None


class StageSummaries(BaseModel):
    """Every stage's summary of one stored iteration (None: the stage did not run or was not stored)."""

    model_config = ConfigDict(frozen=True)

    sample_prompts: SamplePromptsSummary | None = None
    generate: GenerateSummary | None = None
    judge: JudgeSummary | None = None
    meta_judge: MetaJudgeSummary | None = None
    actor_pairs: ActorPairsSummary | None = None
    judge_pairs: JudgePairsSummary | None = None
    pre_train_checks: ChecksSummary | None = None
    train: TrainSummary | None = None
    summary: IterationSummary | None = None

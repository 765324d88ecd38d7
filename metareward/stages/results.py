"""What a stage returns (`StageResult`, one typed subclass per stage) and the names of the artifacts
the stages write under `{root}/{run}/iter-{i}/` (docs/artifacts.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from metareward.checkpoints import ADAPTER_NAME, ModelRef
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

PROMPTS = "prompts"
RESPONSES = "responses"
JUDGMENTS = "judgments"
SCORES = "scores"
META_TARGETS = "meta_targets"
META_JUDGMENTS = "meta_judgments"
ACTOR_PAIRS = "actor_pairs"
ELO = "elo"
JUDGE_PAIRS = "judge_pairs"
TRAIN = "train"
SUMMARY = "summary"
PRE_TRAIN_CHECKS = "pre_train_checks"
# Folders of the train stage besides `model` (M_i): the LoRA adapter (a checkpoint a vLLM engine
# serves as a LoRA) and the trainer checkpoints a killed stage resumes from.
ADAPTER = ADAPTER_NAME
TRAIN_STATE = "train_state"


class StageResult(BaseModel):
    """What a stage returns: where its artifacts are, their key, and its typed summary.

    stage: the stage's name (a key of `metareward.contract.STAGES`).
    uri: the stage's main artifact (None when it wrote none: `train` without pairs).
    uris: every artifact the stage wrote, by artifact name (judge: `judgments` and `scores`).
    key: the stage's fingerprint (`metareward.contract`); "" when it wrote nothing.
    summary: the stage's summary model (`metareward.summaries`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    uri: str | None
    uris: dict[str, str] = Field(default_factory=dict)
    key: str = ""
    summary: StageSummary


class SamplePromptsResult(StageResult):
    summary: SamplePromptsSummary


class GenerateResult(StageResult):
    summary: GenerateSummary


class JudgeResult(StageResult):
    summary: JudgeSummary


class MetaJudgeResult(StageResult):
    summary: MetaJudgeSummary


class ActorPairsResult(StageResult):
    summary: ActorPairsSummary


class JudgePairsResult(StageResult):
    summary: JudgePairsSummary


class TrainResult(StageResult):
    """model: M_i (the train summary's `model`), None when nothing was trained."""

    summary: TrainSummary

    @property
    def model(self) -> ModelRef | None:
        return self.summary.model


class ChecksResult(StageResult):
    """The checks of a gate: their table (`uri`) and which passed, warned, failed or were skipped."""

    summary: ChecksSummary


class SummaryResult(StageResult):
    summary: IterationSummary

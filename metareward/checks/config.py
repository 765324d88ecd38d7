"""The `checks` section of the run config: each declared check's thresholds and each gate's policy.

Pure pydantic. What the checks measure and why the defaults are what they are: `metareward.checks`
and docs/diagnostics.md#checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GatePolicy = Literal["warn", "stop", "approve"]


class CheckThreshold(BaseModel):
    """When one check warns or fails, and how much data it needs to say anything.

    warn / fail: the value past which the check warns / fails (past = above for a check whose high
        values are bad, below for one whose low values are bad; `metareward.checks.CHECKS` says
        which). null: the check never warns / fails. Unset in the YAML: the documented default.
    min_count: below this many measured items (judgments, comparisons, pairs) the check is
        `skipped`, not judged on noise.
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"description": "The warn and fail thresholds of one check and its minimum count."}
    )

    warn: float | None = Field(default=None, description="Warn past this value; unset: the documented default.")
    fail: float | None = Field(default=None, description="Fail past this value; unset: the documented default.")
    min_count: int | None = Field(default=None, ge=0, description="Skip the check below this many items; unset: the default.")


# The documented defaults (docs/diagnostics.md#checks gives the reasons and the paper's figures).
DEFAULT_THRESHOLDS: dict[str, CheckThreshold] = {
    "judge_top_score_share": CheckThreshold(warn=0.5, fail=0.8, min_count=20),
    "judge_score_change": CheckThreshold(warn=0.5, fail=1.0, min_count=20),
    "judge_forced_share": CheckThreshold(warn=0.1, fail=0.5, min_count=20),
    "judge_unparsable_share": CheckThreshold(warn=0.1, fail=0.5, min_count=20),
    "meta_position_bias": CheckThreshold(warn=0.75, fail=0.9, min_count=20),
    "meta_score_bias": CheckThreshold(warn=0.8, fail=0.95, min_count=20),
    "meta_length_bias": CheckThreshold(warn=0.75, fail=0.9, min_count=20),
    "meta_forced_share": CheckThreshold(warn=0.1, fail=0.5, min_count=20),
    "meta_unparsable_share": CheckThreshold(warn=0.1, fail=0.5, min_count=20),
    "response_length_growth": CheckThreshold(warn=0.25, fail=0.5, min_count=20),
    "training_pairs": CheckThreshold(warn=50, fail=1, min_count=0),
    "judge_accuracy_change": CheckThreshold(warn=-0.02, fail=-0.05, min_count=20),
    "lc_win_rate": CheckThreshold(warn=0.5, fail=0.4, min_count=20),
}


def _threshold(description: str):
    return Field(default_factory=CheckThreshold, description=description)


class CheckThresholds(BaseModel):
    """Each declared check's thresholds; a key left out, or a threshold left unset, keeps its default."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"description": "Each check's warn / fail thresholds and minimum count."}
    )

    judge_top_score_share: CheckThreshold = _threshold("Share of valid judgments at the top score 5 (high is bad).")
    judge_score_change: CheckThreshold = _threshold("Mean judge score minus the previous iteration's (high is bad).")
    judge_forced_share: CheckThreshold = _threshold("Share of judgments whose score was forced (high is bad).")
    judge_unparsable_share: CheckThreshold = _threshold("Share of judgments without a usable score (high is bad).")
    meta_position_bias: CheckThreshold = _threshold("Share of verdicts won by the meta-judge's preferred position (high is bad).")
    meta_score_bias: CheckThreshold = _threshold("Share of verdicts won by the higher-scoring judgment (high is bad).")
    meta_length_bias: CheckThreshold = _threshold("Share of verdicts won by the longer judgment (high is bad).")
    meta_forced_share: CheckThreshold = _threshold("Share of meta-judgments whose winner was forced (high is bad).")
    meta_unparsable_share: CheckThreshold = _threshold("Share of meta-judgments without a usable winner (high is bad).")
    response_length_growth: CheckThreshold = _threshold("Mean response length over the previous iteration's, minus 1 (high is bad).")
    training_pairs: CheckThreshold = _threshold("Actor plus judge pairs to train on (low is bad).")
    judge_accuracy_change: CheckThreshold = _threshold("M_i's judge accuracy minus M_{i-1}'s, after the evaluation (low is bad).")
    lc_win_rate: CheckThreshold = _threshold("Length-controlled win rate of M_i over M_{i-1}, after the evaluation (low is bad).")

    @model_validator(mode="after")
    def _fill_defaults(self) -> CheckThresholds:
        for name, default in DEFAULT_THRESHOLDS.items():
            given = getattr(self, name)
            unset = {field: getattr(default, field) for field in CheckThreshold.model_fields if field not in given.model_fields_set}
            object.__setattr__(self, name, given.model_copy(update=unset))
        return self


class GateConfig(BaseModel):
    """What a gate does when one of its checks fails.

    policy: `warn` records the failed checks and goes on; `stop` ends the run with a message naming
        them; `approve` pauses the flow run until a person approves or rejects it (the Prefect UI's
        form, or `metareward approve`), and stops it past `timeout_s`.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": "What a gate does when one of its checks fails."})

    policy: GatePolicy = Field(default="warn", description="`warn` (go on), `stop` (end the run) or `approve` (wait for a person).")
    timeout_s: int = Field(default=86400, ge=1, description="Longest wait for an approval; past it the run stops, naming the gate.")


class ChecksConfig(BaseModel):
    """The declared checks' thresholds and the two gates: before `train` and after the evaluation.

    pre_train: the gate on what the judge and meta-judge produced, before DPO trains on it.
    post_evaluation: the gate on M_i after the evaluation (`evaluation.at_end_of_iteration`): M_i
        becomes the next iteration's base only when it passes or a person approves it.
    max_consecutive_rejections: the run stops after this many iterations in a row whose M_i was not
        promoted [choice: 2].
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"description": "Judge-health checks, the pre-train and post-evaluation gates, and promotion."},
    )

    thresholds: CheckThresholds = Field(default_factory=CheckThresholds, description="Each check's thresholds.")
    pre_train: GateConfig = Field(default_factory=GateConfig, description="The gate before training.")
    post_evaluation: GateConfig = Field(default_factory=GateConfig, description="The gate on M_i after the evaluation.")
    max_consecutive_rejections: int = Field(
        default=2, ge=1, description="Stop the run after this many iterations in a row whose M_i was not promoted."
    )

"""Judge-health checks: declared once, each with a name, the metric it reads, which side is bad, and
thresholds from config (`metareward.checks.config`); Dagster's asset checks are the model.

A check measures one value of an iteration and says `pass`, `warn`, `fail` or `skipped` (fewer than
`min_count` measured items, or no data: an iteration without a meta-judge, iteration 1 for a change
against the previous one). Two gates run them:

    pre_train         on what the judge and meta-judge produced, before DPO trains on it
                      (from the diagnostics row of `metareward.diagnostics.iteration_metrics`)
    post_evaluation   on M_i, after the evaluation (win rate and judge accuracy)

A gate passes when none of its checks failed; what a failed gate does is its policy (`GateConfig`):
record and go on, stop the run, or wait for a person. Pure: pandas only. Defaults and the paper's
figures: docs/diagnostics.md#checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import pandas as pd
from pydantic import BaseModel, ConfigDict

from metareward.checks.config import ChecksConfig, CheckThreshold, CheckThresholds, GateConfig, GatePolicy
from metareward.schema import STATUS_FORCED, STATUS_NO_SCORE, STATUS_NO_VERDICT, STATUS_OUT_OF_RANGE

Gate = Literal["pre_train", "post_evaluation"]
GATES: tuple[Gate, ...] = ("pre_train", "post_evaluation")
CheckStatus = Literal["pass", "warn", "fail", "skipped"]

# What a check reads: the iteration's diagnostics row and the previous iteration's (pre-train), or
# the evaluation's figures (post-evaluation). A measure returns (value, count): count is the number
# of items the value is measured over (None: the data is missing).
Measure = Callable[[Mapping[str, Any], Mapping[str, Any] | None], tuple[float | None, float | None]]


@dataclass(frozen=True)
class Check:
    """One declared check. bad: `high` (a value above the thresholds is bad) or `low`."""

    name: str
    gate: Gate
    reads: str
    bad: Literal["high", "low"]
    measure: Measure


def _get(row: Mapping[str, Any] | None, name: str) -> float | None:
    if row is None or name not in row:
        return None
    value = row[name]
    return None if value is None or pd.isna(value) else float(value)


def _sum(row: Mapping[str, Any], names: Sequence[str]) -> float | None:
    values = [_get(row, name) for name in names]
    return None if all(value is None for value in values) else sum(value or 0.0 for value in values)


def _share_of(row: Mapping[str, Any], statuses: Sequence[str], prefix: str, total: str) -> tuple[float | None, float | None]:
    count = _get(row, total)
    hits = _sum(row, [f"{prefix}_status_{status}" for status in statuses])
    if not count or hits is None:
        return None, count
    return hits / count, count


def _valid_judgments(row: Mapping[str, Any]) -> float | None:
    return _sum(row, ["judge_status_ok", f"judge_status_{STATUS_FORCED}"])


def _top_score(row, previous):
    return _get(row, "judge_top_score_share"), _valid_judgments(row)


def _score_change(row, previous):
    now, before = _get(row, "judge_score_mean"), _get(previous, "judge_score_mean")
    return (None if now is None or before is None else now - before), _valid_judgments(row)


def _position_bias(row, previous):
    share = _get(row, "meta_position_bias")
    return (None if share is None else max(share, 1.0 - share)), _get(row, "meta_decided")


def _length_growth(row, previous):
    now, before = _get(row, "actor_chars_mean"), _get(previous, "actor_chars_mean")
    return (None if now is None or not before else now / before - 1.0), _get(row, "actor_responses")


def _training_pairs(row, previous):
    pairs = _sum(row, ["actor_pairs", "judge_pairs"])
    return pairs, pairs


def _win_rate(figures, previous):
    return _get(figures, "lc_win_rate"), _get(figures, "decided")


def _accuracy_change(figures, previous):
    now, before = _get(figures, "accuracy_x"), _get(figures, "accuracy_y")
    counts = [count for count in (_get(figures, "scored_pairs_x"), _get(figures, "scored_pairs_y")) if count is not None]
    return (None if now is None or before is None else now - before), (min(counts) if counts else None)


_UNPARSABLE_JUDGMENT = (STATUS_NO_SCORE, STATUS_OUT_OF_RANGE)

CHECKS: dict[str, Check] = {
    check.name: check
    for check in (
        Check("judge_top_score_share", "pre_train", "judgments", "high", _top_score),
        Check("judge_score_change", "pre_train", "judgments, previous iteration's judgments", "high", _score_change),
        Check("judge_forced_share", "pre_train", "judgments", "high",
              lambda row, _: _share_of(row, (STATUS_FORCED,), "judge", "judge_judgments")),
        Check("judge_unparsable_share", "pre_train", "judgments", "high",
              lambda row, _: _share_of(row, _UNPARSABLE_JUDGMENT, "judge", "judge_judgments")),
        Check("meta_position_bias", "pre_train", "meta_judgments", "high", _position_bias),
        Check("meta_score_bias", "pre_train", "meta_judgments, judgments", "high",
              lambda row, _: (_get(row, "meta_score_bias"), _get(row, "meta_score_bias_comparisons"))),
        Check("meta_length_bias", "pre_train", "meta_judgments, judgments", "high",
              lambda row, _: (_get(row, "meta_length_bias"), _get(row, "meta_length_bias_comparisons"))),
        Check("meta_forced_share", "pre_train", "meta_judgments", "high",
              lambda row, _: _share_of(row, (STATUS_FORCED,), "meta", "meta_judgments")),
        Check("meta_unparsable_share", "pre_train", "meta_judgments", "high",
              lambda row, _: _share_of(row, (STATUS_NO_VERDICT,), "meta", "meta_judgments")),
        Check("response_length_growth", "pre_train", "responses, previous iteration's responses", "high", _length_growth),
        Check("training_pairs", "pre_train", "actor_pairs, judge_pairs", "low", _training_pairs),
        Check("judge_accuracy_change", "post_evaluation", "evaluation judge accuracy of M_i and M_{i-1}", "low", _accuracy_change),
        Check("lc_win_rate", "post_evaluation", "evaluation comparisons of M_i against M_{i-1}", "low", _win_rate),
    )
}


class CheckResult(BaseModel):
    """One check's outcome: the measured value, over how many items, the thresholds it was held
    to, and pass / warn / fail / skipped with a one-line reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate: Gate
    check: str
    reads: str
    status: CheckStatus
    value: float | None
    count: float | None
    warn: float | None
    fail: float | None
    min_count: int
    message: str


class GateChecks(BaseModel):
    """A gate's checks as the flow hands them on: the results, their table and its fingerprint
    (which a person's decision is stored against)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate: Gate
    uri: str
    key: str
    results: list[CheckResult]


def _past(value: float, threshold: float | None, bad: str) -> bool:
    return threshold is not None and (value > threshold if bad == "high" else value < threshold)


def judge(check: Check, threshold: CheckThreshold, value: float | None, count: float | None) -> CheckResult:
    """`check`'s result for a measured value (None: no data) over `count` items."""
    min_count = int(threshold.min_count or 0)
    side = "above" if check.bad == "high" else "below"
    if value is None:
        status, message = "skipped", "no data"
    elif count is None or count < min_count:
        status, message = "skipped", f"{0 if count is None else int(count)} item(s), fewer than min_count {min_count}"
    elif _past(value, threshold.fail, check.bad):
        status, message = "fail", f"{value:.4g} is {side} the fail threshold {threshold.fail:g}"
    elif _past(value, threshold.warn, check.bad):
        status, message = "warn", f"{value:.4g} is {side} the warn threshold {threshold.warn:g}"
    else:
        status, message = "pass", f"{value:.4g} within the thresholds"
    return CheckResult(
        gate=check.gate, check=check.name, reads=check.reads, status=status, value=value, count=count,
        warn=threshold.warn, fail=threshold.fail, min_count=min_count, message=message,
    )


def run_checks(gate: Gate, thresholds: CheckThresholds, row: Mapping[str, Any], previous: Mapping[str, Any] | None = None) -> list[CheckResult]:
    """Every check of `gate` on `row` (pre-train: the diagnostics row; post-evaluation: the
    evaluation's figures, `evaluation_figures`) and the previous iteration's row."""
    results = []
    for check in CHECKS.values():
        if check.gate == gate:
            value, count = check.measure(row, previous)
            results.append(judge(check, getattr(thresholds, check.name), value, count))
    return results


def evaluation_figures(win_rate: Mapping[str, Any], accuracy: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the post-evaluation checks read, from the evaluation's win-rate summary and its
    judge-accuracy rows (role `x` is M_i, `y` M_{i-1})."""
    figures: dict[str, Any] = {"lc_win_rate": win_rate.get("lc_win_rate"), "decided": win_rate.get("decided")}
    for row in accuracy:
        suffix = "x" if row.get("role") == "x" else "y"
        figures[f"accuracy_{suffix}"] = row.get("accuracy")
        figures[f"scored_pairs_{suffix}"] = row.get("scored_pairs")
    return figures


def failed(results: Sequence[CheckResult]) -> list[str]:
    """The names of the checks that failed."""
    return [result.check for result in results if result.status == "fail"]


def results_table(results: Sequence[CheckResult]) -> pd.DataFrame:
    """The results as a table, one row per check (the gate's Parquet artifact and UI table)."""
    columns = list(CheckResult.model_fields)
    table = pd.DataFrame([result.model_dump() for result in results], columns=columns)
    return table.astype({"value": "float64", "count": "float64", "warn": "float64", "fail": "float64", "min_count": "int64"})


def read_results(table: pd.DataFrame) -> list[CheckResult]:
    """The results of a stored table."""
    return [CheckResult.model_validate({key: (None if pd.isna(value) else value) for key, value in row.items()}) for row in table.to_dict("records")]


__all__ = [
    "CHECKS", "GATES", "Check", "CheckResult", "GateChecks", "CheckStatus", "CheckThreshold", "CheckThresholds", "ChecksConfig",
    "Gate", "GateConfig", "GatePolicy", "evaluation_figures", "failed", "judge", "read_results", "results_table", "run_checks",
]

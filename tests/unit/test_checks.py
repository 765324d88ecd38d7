"""Judge-health checks (`metareward.checks`) on hand-made tables whose biases are known.

The pre-train checks read the diagnostics row, so every table here goes through the real
`metareward.diagnostics.iteration_metrics`, as in the `pre_train_checks` stage; the
post-evaluation checks read `evaluation_figures` of the evaluation's win rate and accuracy rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
from pydantic import ValidationError

from metareward.checks import (
    CHECKS,
    GATES,
    CheckResult,
    ChecksConfig,
    CheckThresholds,
    evaluation_figures,
    failed,
    read_results,
    results_table,
    run_checks,
)
from metareward.checks.config import DEFAULT_THRESHOLDS
from metareward.diagnostics import IterationTables, iteration_metrics
from metareward.schema import (
    FINISH_REASON,
    JUDGMENT,
    JUDGMENT_A_ID,
    JUDGMENT_B_ID,
    JUDGMENT_ID,
    JUDGMENTS_COLUMNS,
    META_JUDGMENT,
    META_JUDGMENTS_COLUMNS,
    N_TOKENS,
    PAIRS_COLUMNS,
    PROMPT_ID,
    RESPONSE,
    RESPONSE_ID,
    RESPONSES_COLUMNS,
    SCORE,
    STATUS,
    WINNER,
)

DEFAULTS = CheckThresholds()


# ----------------------------------------------------------------------------------------------
# hand-made tables


def judgments(scores: list[float | None], kinds: list[str] | None = None) -> pd.DataFrame:
    """One judgment per score, each of its own response; status `ok` for a score, `no_score` for None."""
    kinds = kinds or ["ok" if score is not None else "no_score" for score in scores]
    rows = [
        (f"p{k}", f"r{k}", f"r{k}-j", "y" * 40, score, status, "stop")
        for k, (score, status) in enumerate(zip(scores, kinds, strict=True))
    ]
    return pd.DataFrame(rows, columns=list(JUDGMENTS_COLUMNS)).astype({SCORE: "float64"})


class Comparison(NamedTuple):
    """One meta-judge verdict on Judgment A against Judgment B (their scores and text lengths)."""

    score_a: float
    score_b: float
    chars_a: int
    chars_b: int
    winner: str | None
    status: str = "ok"


def meta(comparisons: list[Comparison]) -> dict[str, pd.DataFrame]:
    """The judgments and meta-judgments of `comparisons`: each compares two judgments of its own response."""
    judgment_rows, meta_rows = [], []
    for k, c in enumerate(comparisons):
        a, b = f"r{k}-a", f"r{k}-b"
        judgment_rows += [
            (f"p{k}", f"r{k}", a, "y" * c.chars_a, c.score_a, "ok", "stop"),
            (f"p{k}", f"r{k}", b, "y" * c.chars_b, c.score_b, "ok", "stop"),
        ]
        meta_rows.append((f"p{k}", f"r{k}", a, b, f"Winner: Judgement {c.winner}", c.winner, c.status))
    return {
        "judgments": pd.DataFrame(judgment_rows, columns=list(JUDGMENTS_COLUMNS)).astype({SCORE: "float64"}),
        "meta_judgments": pd.DataFrame(meta_rows, columns=list(META_JUDGMENTS_COLUMNS)),
    }


def responses(n: int, chars: int) -> pd.DataFrame:
    rows = [(f"p{k}", f"r{k}", "x" * chars, chars // 4, "stop") for k in range(n)]
    return pd.DataFrame(rows, columns=list(RESPONSES_COLUMNS))


def pairs(n: int, kind: str = "actor") -> pd.DataFrame:
    rows = [
        {
            "kind": kind, PROMPT_ID: f"p{k}", "prompt": "q?", "chosen": "good", "rejected": "bad",
            "chosen_id": f"c{k}", "rejected_id": f"x{k}", "chosen_score": 4.0, "rejected_score": 2.0,
            "chosen_chars": 4, "rejected_chars": 3, "chosen_elo": None, "rejected_elo": None,
        }
        for k in range(n)
    ]
    return pd.DataFrame(rows, columns=list(PAIRS_COLUMNS)).astype(
        {"chosen_score": "float64", "rejected_score": "float64", "chosen_chars": "int64", "rejected_chars": "int64",
         "chosen_elo": "float64", "rejected_elo": "float64"}
    )


def row(iteration: int = 2, **tables) -> dict:
    """The diagnostics row of an iteration made of `tables`, as the pre_train_checks stage reads it."""
    return iteration_metrics(IterationTables(iteration=iteration, **tables)).iloc[0].to_dict()


def pre_train(tables: dict, previous: dict | None = None, thresholds: CheckThresholds = DEFAULTS) -> dict[str, CheckResult]:
    return {result.check: result for result in run_checks("pre_train", thresholds, row(**tables), previous)}


def statuses(results: dict[str, CheckResult], *names: str) -> tuple[str, ...]:
    return tuple(results[name].status for name in names)


def share(n: int, hits: int, hit, miss) -> list:
    """`hits` times `hit`, then `miss` up to n items."""
    return [hit] * hits + [miss] * (n - hits)


def score_biased(n: int, higher_wins: int) -> list[Comparison]:
    """n comparisons of a 4 and a 2 of equal length, the 4 in position A on every other one; the
    first `higher_wins` verdicts go to the 4, the rest to the 2 (so position stays near 0.5)."""
    comparisons = []
    for k in range(n):
        a_higher = k % 2 == 0
        winner = "A" if a_higher == (k < higher_wins) else "B"
        comparisons.append(Comparison(4.0 if a_higher else 2.0, 2.0 if a_higher else 4.0, 50, 50, winner))
    return comparisons


def length_biased(n: int, longer_wins: int) -> list[Comparison]:
    """As `score_biased`, with equal scores and texts of 80 and 40 characters."""
    comparisons = []
    for k in range(n):
        a_longer = k % 2 == 0
        winner = "A" if a_longer == (k < longer_wins) else "B"
        comparisons.append(Comparison(3.0, 3.0, 80 if a_longer else 40, 40 if a_longer else 80, winner))
    return comparisons


def position_biased(n: int, a_wins: int) -> list[Comparison]:
    """n comparisons of equal scores and lengths; the first `a_wins` go to Judgment A."""
    return [Comparison(3.0, 3.0, 50, 50, winner) for winner in share(n, a_wins, "A", "B")]


# ----------------------------------------------------------------------------------------------
# declarations and config


def test_every_declared_check_has_a_threshold_field_and_a_default_on_the_bad_side():
    assert set(CHECKS) == set(DEFAULT_THRESHOLDS) == set(CheckThresholds.model_fields)
    assert {check.gate for check in CHECKS.values()} == set(GATES)
    for name, check in CHECKS.items():
        default = DEFAULT_THRESHOLDS[name]
        # the warn threshold is met before the fail threshold on the bad side
        assert (default.warn <= default.fail) if check.bad == "high" else (default.warn >= default.fail), name
        assert getattr(DEFAULTS, name) == default


def test_a_partial_override_keeps_the_other_defaults():
    config = ChecksConfig.model_validate({"thresholds": {"meta_score_bias": {"warn": 0.7}, "training_pairs": {"min_count": 10}}})
    score_bias = config.thresholds.meta_score_bias
    assert (score_bias.warn, score_bias.fail, score_bias.min_count) == (0.7, 0.95, 20)
    pairs_threshold = config.thresholds.training_pairs
    assert (pairs_threshold.warn, pairs_threshold.fail, pairs_threshold.min_count) == (50, 1, 10)
    for name in set(CHECKS) - {"meta_score_bias", "training_pairs"}:
        assert getattr(config.thresholds, name) == DEFAULT_THRESHOLDS[name], name
    # gates and promotion keep theirs
    assert (config.pre_train.policy, config.post_evaluation.policy, config.max_consecutive_rejections) == ("warn", "warn", 2)
    assert config.pre_train.timeout_s == config.post_evaluation.timeout_s == 86400


def test_an_explicit_null_threshold_turns_that_level_off():
    thresholds = CheckThresholds.model_validate({"meta_score_bias": {"fail": None}})
    assert (thresholds.meta_score_bias.warn, thresholds.meta_score_bias.fail) == (0.8, None)
    # a meta-judge that always prefers the higher score now only warns
    results = pre_train(meta(score_biased(40, 40)), thresholds=thresholds)
    assert results["meta_score_bias"].value == 1.0
    assert results["meta_score_bias"].status == "warn" and results["meta_score_bias"].fail is None


def test_the_documented_table_lists_every_check_with_its_defaults():
    text = (Path(__file__).parents[2] / "docs" / "diagnostics.md").read_text(encoding="utf-8")
    section = text.split("\n## Checks\n", 1)[1]
    documented = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`") and cells[0].strip("`") in CHECKS:
            documented[cells[0].strip("`")] = (cells[1], cells[3], float(cells[4]), float(cells[5]), int(cells[6]))
    assert documented == {
        name: (check.gate, check.bad, DEFAULT_THRESHOLDS[name].warn, DEFAULT_THRESHOLDS[name].fail, DEFAULT_THRESHOLDS[name].min_count)
        for name, check in CHECKS.items()
    }


@pytest.mark.parametrize(
    "config",
    [
        {"thresholds": {"judge_score_inflation": {"warn": 0.5}}},  # no such check
        {"thresholds": {"judge_top_score_share": {"warning": 0.5}}},  # no such key
        {"thresholds": {"judge_top_score_share": {"min_count": -1}}},
        {"pre_train": {"policy": "pause"}},
        {"post_evaluation": {"timeout_s": 0}},
        {"max_consecutive_rejections": 0},
        {"gates": {}},
    ],
)
def test_the_config_refuses_what_it_does_not_know(config):
    with pytest.raises(ValidationError):
        ChecksConfig.model_validate(config)


def test_the_config_survives_a_dump_and_reload():
    config = ChecksConfig.model_validate(
        {"thresholds": {"lc_win_rate": {"fail": 0.3}}, "post_evaluation": {"policy": "approve", "timeout_s": 60}}
    )
    again = ChecksConfig.model_validate(config.model_dump())
    assert again == config
    assert again.thresholds.lc_win_rate.warn == 0.5 and again.thresholds.lc_win_rate.fail == 0.3


def test_each_gate_runs_only_its_own_checks():
    pre = run_checks("pre_train", DEFAULTS, row(judgments=judgments([3.0] * 20)))
    post = run_checks("post_evaluation", DEFAULTS, evaluation_figures({"lc_win_rate": 0.6, "decided": 40}, []))
    assert [r.check for r in pre] == [name for name, check in CHECKS.items() if check.gate == "pre_train"]
    assert [r.check for r in post] == ["judge_accuracy_change", "lc_win_rate"]
    assert {r.gate for r in pre} == {"pre_train"} and {r.gate for r in post} == {"post_evaluation"}


# ----------------------------------------------------------------------------------------------
# the judge


@pytest.mark.parametrize(("fives", "expected"), [(18, "fail"), (12, "warn"), (10, "pass"), (4, "pass")])
def test_top_score_share(fives, expected):
    # warn above 0.5, fail above 0.8; exactly 0.5 (10 of 20) is not past the warn threshold
    result = pre_train({"judgments": judgments(share(20, fives, 5.0, 3.0))})["judge_top_score_share"]
    assert result.value == pytest.approx(fives / 20) and result.count == 20
    assert result.status == expected


def test_top_score_share_counts_valid_judgments_only():
    # 20 scores of 5 among 30 judgments (10 without a score): share 1.0 of 20 valid judgments
    results = pre_train({"judgments": judgments(share(30, 20, 5.0, None))})
    assert results["judge_top_score_share"].value == 1.0 and results["judge_top_score_share"].count == 20
    assert results["judge_top_score_share"].status == "fail"


@pytest.mark.parametrize(("now", "expected"), [([4.0] * 16 + [5.0] * 4, "fail"), ([3.0] * 8 + [4.0] * 12, "warn"), ([2.0] * 20, "pass")])
def test_score_change_against_the_previous_iteration(now, expected):
    previous = row(iteration=1, judgments=judgments([3.0] * 20))  # mean 3
    result = pre_train({"judgments": judgments(now)}, previous)["judge_score_change"]
    # +1.2 fails (above 1.0), +0.6 warns (above 0.5); a falling mean is not inflation
    assert result.value == pytest.approx(sum(now) / len(now) - 3.0)
    assert result.status == expected


def test_score_change_is_skipped_without_a_previous_iteration():
    results = pre_train({"judgments": judgments([5.0] * 20)})
    assert results["judge_score_change"].status == "skipped" and results["judge_score_change"].value is None
    assert results["judge_score_change"].message == "no data"
    assert results["judge_top_score_share"].status == "fail"  # the rest still runs


@pytest.mark.parametrize(("forced", "expected"), [(12, "fail"), (3, "warn"), (1, "pass"), (0, "pass")])
def test_judge_forced_share(forced, expected):
    result = pre_train({"judgments": judgments([3.0] * 20, share(20, forced, "forced", "ok"))})["judge_forced_share"]
    assert result.value == pytest.approx(forced / 20) and result.status == expected


def test_judge_unparsable_share_counts_no_score_and_out_of_range():
    scores = [None] * 11 + [3.0] * 9
    kinds = ["no_score"] * 5 + ["out_of_range"] * 6 + ["ok"] * 9
    results = pre_train({"judgments": judgments(scores, kinds)})
    assert results["judge_unparsable_share"].value == pytest.approx(11 / 20) and results["judge_unparsable_share"].status == "fail"
    assert results["judge_forced_share"].value == 0.0 and results["judge_forced_share"].status == "pass"
    # the share of unparsable judgments is over all 20; the top-score share over the 9 valid ones: too few
    assert results["judge_unparsable_share"].count == 20
    assert results["judge_top_score_share"].status == "skipped" and results["judge_top_score_share"].count == 9

    warned = pre_train({"judgments": judgments(share(20, 3, None, 3.0))})["judge_unparsable_share"]
    assert warned.value == pytest.approx(0.15) and warned.status == "warn"


# ----------------------------------------------------------------------------------------------
# the meta-judge


@pytest.mark.parametrize(
    ("a_wins", "expected"),
    [(20, "fail"), (0, "fail"), (19, "fail"), (16, "warn"), (4, "warn"), (15, "pass"), (10, "pass")],
)
def test_position_bias_counts_either_position(a_wins, expected):
    # max(share_A, 1 - share_A): always B is as biased as always A
    results = pre_train(meta(position_biased(20, a_wins)))
    result = results["meta_position_bias"]
    assert result.value == pytest.approx(max(a_wins / 20, 1 - a_wins / 20)) and result.count == 20
    assert result.status == expected
    # equal scores and lengths: no score or length comparison to measure
    assert statuses(results, "meta_score_bias", "meta_length_bias") == ("skipped", "skipped")


@pytest.mark.parametrize(
    ("n", "higher_wins", "expected"),
    [
        (40, 40, "fail"),  # always the higher-scoring judgment
        (1000, 977, "fail"),  # the paper's iteration 2 (97.7%)
        (100, 90, "warn"),
        (100, 63, "pass"),  # the paper's iteration 1 (63%)
        (100, 0, "pass"),  # always the lower score: not the failure this check guards against
    ],
)
def test_score_bias(n, higher_wins, expected):
    results = pre_train(meta(score_biased(n, higher_wins)))
    result = results["meta_score_bias"]
    assert result.value == pytest.approx(higher_wins / n) and result.count == n
    assert result.status == expected
    # the higher score sits in either position, so the verdicts show no position bias
    assert results["meta_position_bias"].status == "pass"


@pytest.mark.parametrize(("longer_wins", "expected"), [(40, "fail"), (34, "warn"), (20, "pass")])
def test_length_bias(longer_wins, expected):
    results = pre_train(meta(length_biased(40, longer_wins)))
    result = results["meta_length_bias"]
    assert result.value == pytest.approx(longer_wins / 40) and result.count == 40
    assert result.status == expected
    assert results["meta_position_bias"].status == "pass"
    assert results["meta_score_bias"].status == "skipped"  # equal scores


def test_meta_forced_and_unparsable_shares():
    verdicts = (
        [Comparison(3.0, 3.0, 50, 50, "A", "forced")] * 3
        + [Comparison(3.0, 3.0, 50, 50, None, "no_verdict")] * 12
        + position_biased(10, 5)
    )
    results = pre_train(meta(verdicts))
    forced, unparsable = results["meta_forced_share"], results["meta_unparsable_share"]
    assert forced.value == pytest.approx(3 / 25) and forced.count == 25 and forced.status == "warn"
    assert unparsable.value == pytest.approx(12 / 25) and unparsable.status == "warn"
    # position bias is over the 13 decided verdicts only: too few to judge
    assert results["meta_position_bias"].count == 13 and results["meta_position_bias"].status == "skipped"

    many_forced = pre_train(meta([Comparison(3.0, 3.0, 50, 50, "A", "forced")] * 20 + position_biased(10, 5)))
    assert many_forced["meta_forced_share"].value == pytest.approx(20 / 30) and many_forced["meta_forced_share"].status == "fail"
    clean = pre_train(meta(position_biased(20, 10)))
    assert statuses(clean, "meta_forced_share", "meta_unparsable_share") == ("pass", "pass")


def test_an_iteration_without_a_meta_judge_skips_the_meta_checks():
    results = pre_train({"judgments": judgments([3.0] * 20), "actor_pairs": pairs(60)})
    meta_checks = [name for name in results if name.startswith("meta_")]
    assert len(meta_checks) == 5
    for name in meta_checks:
        assert results[name].status == "skipped" and results[name].value is None and results[name].message == "no data", name
    assert results["training_pairs"].status == "pass"
    assert failed(list(results.values())) == []


# ----------------------------------------------------------------------------------------------
# the actor and the pairs


@pytest.mark.parametrize(("chars", "expected"), [(160, "fail"), (130, "warn"), (125, "pass"), (90, "pass")])
def test_response_length_growth(chars, expected):
    previous = row(iteration=1, responses=responses(20, 100))
    result = pre_train({"responses": responses(20, chars)}, previous)["response_length_growth"]
    assert result.value == pytest.approx(chars / 100 - 1) and result.count == 20
    assert result.status == expected


def test_response_length_growth_needs_a_previous_iteration_and_enough_responses():
    assert pre_train({"responses": responses(20, 400)})["response_length_growth"].status == "skipped"
    previous = row(iteration=1, responses=responses(20, 100))
    few = pre_train({"responses": responses(10, 400)}, previous)["response_length_growth"]
    assert few.value == pytest.approx(3.0) and few.status == "skipped"


@pytest.mark.parametrize(
    ("actor", "judge", "expected"),
    [(0, None, "fail"), (0, 0, "fail"), (1, None, "warn"), (10, 5, "warn"), (40, None, "warn"), (40, 20, "pass"), (50, None, "pass")],
)
def test_training_pairs(actor, judge, expected):
    tables = {"actor_pairs": pairs(actor)} | ({} if judge is None else {"judge_pairs": pairs(judge, "judge")})
    result = pre_train(tables)["training_pairs"]
    # actor plus judge pairs; fail below 1, warn below 50, no minimum count
    assert result.value == actor + (judge or 0) and result.status == expected


# ----------------------------------------------------------------------------------------------
# how much data a check needs


def test_too_few_items_are_skipped_not_judged():
    few = pre_train({"judgments": judgments([5.0] * 10)})["judge_top_score_share"]
    assert few.value == 1.0 and few.count == 10 and few.status == "skipped"
    assert "fewer than min_count 20" in few.message

    lower = CheckThresholds.model_validate({"judge_top_score_share": {"min_count": 5}})
    judged = pre_train({"judgments": judgments([5.0] * 10)}, thresholds=lower)["judge_top_score_share"]
    assert judged.status == "fail" and judged.min_count == 5 and judged.fail == 0.8


def test_an_iteration_without_tables_is_all_skipped():
    results = run_checks("pre_train", DEFAULTS, row(), None)
    assert {result.status for result in results} == {"skipped"} and failed(results) == []


def test_a_series_row_and_a_dict_row_agree():
    tables = meta(score_biased(40, 36)) | {"actor_pairs": pairs(3)}
    series = iteration_metrics(IterationTables(iteration=2, **tables)).iloc[0]
    assert run_checks("pre_train", DEFAULTS, series) == run_checks("pre_train", DEFAULTS, series.to_dict())


# ----------------------------------------------------------------------------------------------
# after the evaluation


def accuracy_rows(x: float | None, y: float | None, scored_x: int = 100, scored_y: int = 90) -> list[dict]:
    return [
        {"role": "y", "model": "iter-1/model", "accuracy": y, "scored_pairs": scored_y},
        {"role": "x", "model": "iter-2/model", "accuracy": x, "scored_pairs": scored_x},
    ]


def post(win_rate: dict, accuracy: list[dict], thresholds: CheckThresholds = DEFAULTS) -> dict[str, CheckResult]:
    return {result.check: result for result in run_checks("post_evaluation", thresholds, evaluation_figures(win_rate, accuracy))}


def test_evaluation_figures_name_m_i_x_and_m_i_minus_1_y():
    figures = evaluation_figures({"lc_win_rate": 0.55, "decided": 200, "win_rate": 0.6}, accuracy_rows(0.7, 0.65))
    assert figures == {
        "lc_win_rate": 0.55, "decided": 200,
        "accuracy_x": 0.7, "scored_pairs_x": 100, "accuracy_y": 0.65, "scored_pairs_y": 90,
    }


@pytest.mark.parametrize(("lc", "expected"), [(0.35, "fail"), (0.45, "warn"), (0.5, "pass"), (0.62, "pass")])
def test_lc_win_rate(lc, expected):
    result = post({"lc_win_rate": lc, "decided": 200}, accuracy_rows(0.7, 0.7))["lc_win_rate"]
    assert result.value == lc and result.count == 200 and result.status == expected


@pytest.mark.parametrize(("x", "expected"), [(0.6, "fail"), (0.67, "warn"), (0.7, "pass"), (0.75, "pass")])
def test_judge_accuracy_change(x, expected):
    result = post({"lc_win_rate": 0.6, "decided": 200}, accuracy_rows(x, 0.7))["judge_accuracy_change"]
    # M_i minus M_{i-1}; counted over the smaller number of scored pairs
    assert result.value == pytest.approx(x - 0.7) and result.count == 90
    assert result.status == expected


def test_post_evaluation_checks_skip_without_enough_data():
    results = post({"lc_win_rate": 0.2, "decided": 10}, accuracy_rows(0.1, 0.9, scored_x=8))
    assert statuses(results, "lc_win_rate", "judge_accuracy_change") == ("skipped", "skipped")
    assert results["judge_accuracy_change"].count == 8
    # no decided comparison, and no accuracy of M_{i-1}
    nothing = post({"lc_win_rate": None, "decided": 0}, accuracy_rows(0.7, 0.7)[1:])
    assert nothing["lc_win_rate"].message == "no data" and nothing["judge_accuracy_change"].message == "no data"
    both_failed = post({"lc_win_rate": 0.3, "decided": 100}, accuracy_rows(0.5, 0.7))
    assert failed(list(both_failed.values())) == ["judge_accuracy_change", "lc_win_rate"]


# ----------------------------------------------------------------------------------------------
# stored results


def _mixed_results() -> list[CheckResult]:
    """Results of both gates with every status, and None values, counts and thresholds."""
    previous = row(iteration=1, judgments=judgments([3.0] * 20))
    tables = {"judgments": judgments([4.0] * 16 + [5.0] * 4), "actor_pairs": pairs(10)}
    no_fail = CheckThresholds.model_validate({"training_pairs": {"fail": None}})
    results = run_checks("pre_train", no_fail, row(**tables), previous)
    results += run_checks("post_evaluation", DEFAULTS, evaluation_figures({"lc_win_rate": 0.45, "decided": 50}, []))
    assert {result.status for result in results} == {"pass", "warn", "fail", "skipped"}
    assert any(result.value is None for result in results) and any(result.fail is None for result in results)
    return results


def test_results_table_round_trip():
    results = _mixed_results()
    table = results_table(results)
    assert list(table.columns) == list(CheckResult.model_fields) and len(table) == len(results)
    assert table["value"].dtype == "float64" and table["min_count"].dtype == "int64"
    assert read_results(table) == results
    assert read_results(results_table([])) == []


def test_results_table_round_trip_through_parquet(tmp_path):
    results = _mixed_results()
    path = tmp_path / "checks.parquet"
    results_table(results).to_parquet(path, engine="pyarrow", index=False)
    stored = pd.read_parquet(path, engine="pyarrow")
    again = read_results(stored)
    assert again == results
    skipped = next(result for result in again if result.check == "meta_score_bias")
    assert skipped.status == "skipped" and skipped.value is None and skipped.count is None
    assert failed(again) == ["judge_score_change"]

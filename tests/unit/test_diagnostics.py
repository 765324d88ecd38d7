"""Diagnostics on hand-made iterations whose biases and counts are known (tests/fixtures/iterations.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from metareward import diagnostics as dx
from metareward.schema import JUDGMENT, JUDGMENT_ID, SCORE
from tests.fixtures.iterations import hand_made_iteration, varied_score


def _metrics(**options) -> pd.Series:
    return dx.iteration_metrics(hand_made_iteration(**options).tables).iloc[0]


def _longer(a: pd.Series, b: pd.Series) -> str:
    return "A" if len(a[JUDGMENT]) > len(b[JUDGMENT]) else "B"


def _higher_score(a: pd.Series, b: pd.Series) -> str:
    return "A" if a[SCORE] > b[SCORE] else "B"


def test_a_meta_judge_that_always_says_a_has_position_bias_one_and_all_weight_on_b():
    row = _metrics(winner=lambda a, b: "A")
    assert row["meta_position_bias"] == 1.0
    assert (row["meta_w1"], row["meta_w2"]) == (0.0, 1.0)
    # both orders of each pair were asked, so it favoured neither score nor length
    assert row["meta_score_bias"] == 0.5 and row["meta_length_bias"] == 0.5
    assert row["meta_decided"] == row["meta_judgments"] == row["meta_status_ok"]


def test_always_choosing_the_longer_judgment_gives_length_bias_one():
    # in the hand-made tables the longer judgment of a pair always gave the lower score
    row = _metrics(winner=_longer)
    assert row["meta_length_bias"] == 1.0
    assert row["meta_score_bias"] == 0.0
    assert row["meta_position_bias"] == 0.5
    assert row["meta_length_bias_comparisons"] == row["meta_decided"] > 0


def test_always_choosing_the_higher_score_gives_score_bias_one_and_elo_spread():
    row = _metrics(winner=_higher_score)
    assert row["meta_score_bias"] == 1.0 and row["meta_length_bias"] == 0.0
    assert row["meta_elo_spread_mean"] > 0 and row["meta_elo_spread_max"] >= row["meta_elo_spread_mean"]
    # the judge pairs follow the verdicts: the chosen judgment is the one with the higher score
    assert row["judge_pairs"] > 0 and row["judge_chosen_higher_score_share"] == 1.0 and row["judge_chosen_longer_share"] == 0.0


def test_score_bias_counts_only_comparisons_of_different_scores():
    # judgment 0 and 1 of every response agree (score 2), judgment 2 gives 4: of the 6 ordered
    # comparisons of a target, 4 have different scores
    row = _metrics(score=lambda p, r, j: 4.0 if j == 2 else 2.0, winner=_higher_score)
    assert row["meta_score_bias_comparisons"] == 4 * row["meta_targets"]
    assert row["meta_score_bias"] == 1.0


def test_a_judge_that_always_gives_five_shows_inflation_and_leaves_nothing_to_compare():
    row = _metrics(score=lambda p, r, j: 5.0)
    assert row["judge_all_same_share"] == 1.0 and row["judge_prompts_all_same"] == row["judge_prompts_scored"] == 3
    assert row["judge_top_score_share"] == 1.0 and row["judge_score_mean"] == 5.0 and row["judge_score_var"] == 0.0
    assert row["actor_pairs"] == 0 and row["actor_pairs_dropped_all_scores_equal"] == 3
    # no variance, so no meta-judge target: the biases have no verdict to be shares of
    assert row["meta_targets"] == 0 and row["meta_targets_dropped_no_score_variance"] == 3
    assert row["meta_judgments"] == 0 and pd.isna(row["meta_position_bias"]) and pd.isna(row["meta_score_bias"])


def test_judge_statuses_by_cause_and_the_score_distribution():
    # judgment 2 of every response has no score; response 0's judgment 0 is forced (see the fixture)
    made = hand_made_iteration(score=lambda p, r, j: None if j == 2 else varied_score(p, r, j))
    row = dx.iteration_metrics(made.tables).iloc[0]
    assert (row["judge_status_ok"], row["judge_status_forced"], row["judge_status_no_score"], row["judge_status_out_of_range"]) == (15, 3, 9, 0)
    assert row["judge_valid_share"] == pytest.approx(18 / 27)
    valid = made.tables.judgments[SCORE].dropna()
    assert row["judge_score_mean"] == pytest.approx(valid.mean())
    assert row["judge_score_var"] == pytest.approx(valid.var(ddof=0))

    histograms = dx.iteration_histograms(made.tables)
    scores = histograms[histograms["histogram"] == dx.JUDGMENT_SCORE]
    centres = (scores["bin_left"] + scores["bin_right"]) / 2
    assert centres.iloc[0] == 0.0 and centres.iloc[-1] == 5.0 and len(scores) == 21
    # scores are r + j for r in 0..2, j in 0..1: 0 once per prompt, 1 and 2 twice, 3 once
    assert dict(zip(centres[scores["count"] > 0], scores["count"][scores["count"] > 0])) == {0.0: 3, 1.0: 6, 2.0: 6, 3.0: 3}


def test_actor_lengths_pairs_and_drops():
    made = hand_made_iteration()
    row = dx.iteration_metrics(made.tables).iloc[0]
    # responses of 10, 20, 30 characters and 2, 4, 6 tokens per prompt; the longest ran out of tokens
    assert (row["actor_chars_mean"], row["actor_chars_max"], row["actor_tokens_mean"]) == (20.0, 30.0, 4.0)
    assert row["actor_truncated_share"] == pytest.approx(1 / 3)
    # the best response is the longest, the worst the shortest
    assert (row["actor_chosen_chars_mean"], row["actor_rejected_chars_mean"]) == (30.0, 10.0)
    assert row["actor_chosen_score_mean"] > row["actor_rejected_score_mean"]
    assert row["actor_chosen_longer_share"] == 1.0 and row["actor_pairs"] == 3
    dropped = made.tables.actor_pairs.attrs["dropped"]
    assert {name: row[f"actor_pairs_dropped_{name}"] for name in dropped} == dropped

    histograms = dx.iteration_histograms(made.tables)
    totals = histograms.groupby("histogram")["count"].sum()
    assert totals[dx.RESPONSE_CHARS] == totals[dx.RESPONSE_TOKENS] == 9
    assert totals[dx.ACTOR_CHOSEN_CHARS] == totals[dx.ACTOR_REJECTED_CHARS] == 3
    chars = histograms[histograms["histogram"] == dx.RESPONSE_CHARS]
    chosen = histograms[histograms["histogram"] == dx.ACTOR_CHOSEN_CHARS]
    assert chars["bin_left"].tolist() == chosen["bin_left"].tolist()  # same bins, so they overlay


def test_training_metrics_are_the_last_logged_row():
    row = _metrics(train_losses=[0.7, 0.6, 0.4])
    assert row["train_trained"] and row["train_steps"] == 3
    assert (row["train_final_loss"], row["train_final_margin"], row["train_final_accuracy"]) == (0.4, 0.3, 0.75)


def test_missing_stages_give_nulls_in_the_same_columns():
    full = dx.iteration_metrics(hand_made_iteration().tables)
    bare = dx.iteration_metrics(hand_made_iteration(winner=None, train_losses=None).tables)
    assert list(bare.columns) == list(full.columns)
    assert (bare.dtypes == full.dtypes).all()
    row = bare.iloc[0]
    for name in ("meta_judgments", "meta_position_bias", "meta_w1", "meta_elo_spread_mean", "meta_targets", "judge_pairs",
                 "judge_pairs_dropped_elo_all_equal", "judge_chosen_longer_share", "train_steps", "train_final_loss"):
        assert pd.isna(row[name]), name
    assert row["train_trained"] == False  # noqa: E712 (a nullable boolean)
    assert row["actor_pairs"] == 3

    nothing = dx.iteration_metrics(dx.IterationTables(iteration=4)).iloc[0]
    assert nothing["iteration"] == 4 and all(pd.isna(value) for name, value in nothing.items() if name != "iteration")
    assert dx.iteration_histograms(dx.IterationTables(iteration=4)).empty


def test_a_verdict_on_a_judgment_missing_from_the_judgments_counts_for_no_bias():
    made = hand_made_iteration(winner=_longer)
    meta_judgments = made.tables.meta_judgments
    first = meta_judgments.iloc[0]
    # a judgment table without the first comparison's judgment A: that comparison has no score or length
    made.tables.judgments = made.tables.judgments[made.tables.judgments[JUDGMENT_ID] != first["judgment_a_id"]]
    row = dx.iteration_metrics(made.tables).iloc[0]
    involved = ((meta_judgments["judgment_a_id"] == first["judgment_a_id"]) | (meta_judgments["judgment_b_id"] == first["judgment_a_id"])).sum()
    assert row["meta_length_bias_comparisons"] == len(meta_judgments) - involved
    assert row["meta_length_bias"] == 1.0 and not math.isnan(row["meta_score_bias"])


def test_fractional_scores_keep_their_own_bin():
    made = hand_made_iteration(score=lambda p, r, j: 4.75 if j else 4.5, winner=None)
    histograms = dx.iteration_histograms(made.tables)
    scores = histograms[(histograms["histogram"] == dx.JUDGMENT_SCORE) & (histograms["count"] > 0)]
    centres = (scores["bin_left"] + scores["bin_right"]) / 2
    assert dict(zip(centres, scores["count"])) == {4.5: 9, 4.75: 18}
    assert dx.iteration_metrics(made.tables).iloc[0]["judge_top_score_share"] == 0.0

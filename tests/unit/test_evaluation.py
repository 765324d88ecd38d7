"""The evaluation's pure logic: verdict parsing, win-rate bookkeeping over both orders, the
length-controlled win rate on synthetic outcomes with a known length effect, judge accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metareward.evaluation import (
    ORDER_X_FIRST,
    ORDER_Y_FIRST,
    fit_logistic,
    judge_accuracy,
    length_controlled_win_rate,
    parse_comparison_verdict,
    render_comparison_prompt,
    win_rate_summary,
    winner_of,
)


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A is more precise.\nWinner: A", "A"),
        ("Winner: B.", "B"),
        ("**Winner:** **B**", "B"),
        ("winner: response a", "A"),
        ("Winner: [B]", "B"),
        ("Winner:\nA", "A"),
        ("Winner: A\nOn reflection B is better.\nWinner: B", "B"),
        ("Conclude with Winner: A or B", None),
        ("Winner: A | B", None),
        ("Winner: Assistant", None),
        ("Winner: C", None),
        ("I prefer the first one.", None),
        (None, None),
    ],
)
def test_comparison_verdicts_are_parsed_from_the_last_winner_line(text, verdict):
    assert parse_comparison_verdict(text) == verdict


def test_comparison_prompt_inserts_texts_as_they_are():
    text = render_comparison_prompt("Say {hi}", "Response {a}", "Winner: B")
    assert "Instruction: Say {hi}" in text
    assert "<response_a>\nResponse {a}\n</response_a>" in text and "<response_b>\nWinner: B\n</response_b>" in text


def test_a_verdict_names_the_model_in_the_slot_it_picked():
    assert winner_of(ORDER_X_FIRST, "A") == "x" and winner_of(ORDER_X_FIRST, "B") == "y"
    assert winner_of(ORDER_Y_FIRST, "A") == "y" and winner_of(ORDER_Y_FIRST, "B") == "x"
    assert winner_of(ORDER_Y_FIRST, None) is None
    with pytest.raises(ValueError, match="order"):
        winner_of("first", "A")


def _comparisons(rows):
    """A comparisons table from (prompt_id, order, verdict, status, x_chars, y_chars) rows."""
    table = pd.DataFrame(rows, columns=["prompt_id", "order", "verdict", "status", "x_chars", "y_chars"])
    table["winner"] = [winner_of(order, verdict) for order, verdict in zip(table["order"], table["verdict"])]
    return table


def test_win_rate_counts_both_orders_and_undoes_the_position_swap():
    table = _comparisons(
        [
            # p1: X wins in both orders (A when X is first, B when Y is first)
            ("p1", ORDER_X_FIRST, "A", "ok", 100, 50),
            ("p1", ORDER_Y_FIRST, "B", "forced", 100, 50),
            # p2: a judge that always says A: one win each, a split prompt
            ("p2", ORDER_X_FIRST, "A", "ok", 40, 60),
            ("p2", ORDER_Y_FIRST, "A", "ok", 40, 60),
            # p3: Y wins both
            ("p3", ORDER_X_FIRST, "B", "ok", 30, 90),
            ("p3", ORDER_Y_FIRST, "A", "ok", 30, 90),
            # p4: one order undecided (parse mode): its decided order counts alone
            ("p4", ORDER_X_FIRST, None, "no_verdict", 70, 70),
            ("p4", ORDER_Y_FIRST, "B", "ok", 70, 70),
        ]
    )
    summary = win_rate_summary(table, bootstrap_samples=200, seed=1)
    assert summary["comparisons"] == 8 and summary["decided"] == 7
    assert summary["statuses"] == {"ok": 6, "forced": 1, "no_verdict": 1}
    assert (summary["x_wins"], summary["y_wins"]) == (4, 3)
    assert summary["win_rate"] == pytest.approx(4 / 7)
    assert (summary["prompts_x_won_both"], summary["prompts_split"], summary["prompts_y_won_both"]) == (1, 1, 1)
    assert summary["verdicts_for_a"] == pytest.approx(4 / 7)
    assert summary["win_rate_low"] <= summary["win_rate"] <= summary["win_rate_high"]
    assert 0.0 <= summary["lc_low"] <= summary["lc_win_rate"] <= summary["lc_high"] <= 1.0


def test_a_table_without_any_decided_comparison_has_no_estimates():
    table = _comparisons([("p1", ORDER_X_FIRST, None, "no_verdict", 10, 20), ("p1", ORDER_Y_FIRST, None, "no_verdict", 10, 20)])
    summary = win_rate_summary(table, bootstrap_samples=10)
    assert summary["decided"] == 0 and summary["win_rate"] is None and summary["lc_win_rate"] is None


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    feature = rng.normal(size=20_000)
    outcomes = rng.random(20_000) < 1 / (1 + np.exp(-(-0.7 + 1.3 * feature)))
    intercept, slope = fit_logistic(feature, outcomes.astype(float))
    assert intercept == pytest.approx(-0.7, abs=0.05) and slope == pytest.approx(1.3, abs=0.05)


def test_logistic_fit_stays_finite_when_one_model_wins_everything():
    intercept, slope = fit_logistic(np.array([-1.0, 0.5, 1.0, 0.0]), np.ones(4))
    assert np.isfinite(intercept) and np.isfinite(slope) and intercept > 2


def test_lc_win_rate_recovers_the_intercept_of_a_known_length_effect():
    """Outcomes from P(X wins) = sigmoid(b0 + b1 tanh(d / sd)) with X's answers mostly longer: the raw
    win rate is inflated by length, the LC win rate returns sigmoid(b0), and its interval covers it."""
    rng = np.random.default_rng(7)
    b0, b1, prompts = -0.4, 2.0, 800
    difference = np.repeat(rng.normal(200.0, 300.0, prompts), 2)  # both orders share the texts
    feature = np.tanh(difference / difference.std())
    x_won = (rng.random(2 * prompts) < 1 / (1 + np.exp(-(b0 + b1 * feature)))).astype(float)
    ids = np.repeat([f"p{index}" for index in range(prompts)], 2)

    estimate = length_controlled_win_rate(ids, x_won, difference, bootstrap_samples=300, seed=3)
    truth = 1 / (1 + np.exp(-b0))
    assert estimate.comparisons == 2 * prompts and estimate.prompts == prompts
    assert estimate.lc_win_rate == pytest.approx(truth, abs=0.03)
    assert estimate.lc_low < truth < estimate.lc_high
    assert estimate.lc_high - estimate.lc_low < 0.12
    assert estimate.length_slope == pytest.approx(b1, abs=0.3)
    assert estimate.win_rate > truth + 0.1  # the raw win rate rewards length
    assert estimate.win_rate_low < estimate.win_rate < estimate.win_rate_high


def test_lc_win_rate_equals_the_win_rate_when_lengths_do_not_differ():
    ids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    estimate = length_controlled_win_rate(ids, [1, 1, 1, 0, 0, 1, 1, 1], [0.0] * 8, bootstrap_samples=50)
    assert estimate.win_rate == pytest.approx(0.75)
    assert estimate.lc_win_rate == pytest.approx(0.75, abs=0.01)  # the L2 term shrinks it a hair


def test_judge_accuracy_counts_correct_wrong_ties_and_unscored_pairs():
    judgments = pd.DataFrame(
        [
            ("p1", "chosen", 4.0, "ok"),
            ("p1", "rejected", 1.0, "forced"),
            ("p2", "chosen", 2.0, "ok"),
            ("p2", "rejected", 3.0, "ok"),
            ("p3", "chosen", 3.0, "forced"),
            ("p3", "rejected", 3.0, "forced"),
            ("p4", "chosen", np.nan, "no_score"),
            ("p4", "rejected", 5.0, "ok"),
            ("p5", "chosen", 5.0, "ok"),
            ("p5", "rejected", 0.0, "ok"),
        ],
        columns=["pair_id", "side", "score", "status"],
    )
    result = judge_accuracy(judgments)
    assert (result["pairs"], result["scored_pairs"], result["unscored_pairs"]) == (5, 4, 1)
    assert (result["correct"], result["wrong"], result["ties"]) == (2, 1, 1)
    assert result["accuracy"] == pytest.approx(0.5) and result["tie_share"] == pytest.approx(0.25)
    assert result["statuses"] == {"ok": 6, "forced": 3, "no_score": 1, "out_of_range": 0}

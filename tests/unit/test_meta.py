"""Meta-judge side: targets, comparison plan, position weights, Elo, judge pairs."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.hashing import tie_break_key
from metareward.meta import (
    ELO_BASE,
    ELO_SCALE,
    JUDGE_DROP_REASONS,
    judgment_elo,
    plan_comparisons,
    positional_weights,
    select_judge_pairs,
    select_meta_targets,
)
from metareward.prompts import render_judge_prompt
from metareward.schema import ELO_COLUMNS, PAIRS_COLUMNS, SchemaError

PROPERTY = settings(deadline=None, max_examples=80)  # shared CPUs: no per-example deadline


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def judgments_table(rows):
    """rows: (prompt_id, response_id, judgment_id, score or None[, status])."""
    records = []
    for row in rows:
        prompt_id, response_id, judgment_id, score = row[:4]
        status = row[4] if len(row) > 4 else ("ok" if score is not None else "no_score")
        records.append(
            {
                "prompt_id": prompt_id,
                "response_id": response_id,
                "judgment_id": judgment_id,
                "judgment": f"Judgment {judgment_id}. Score: {score}",
                "score": score,
                "status": status,
            }
        )
    return pd.DataFrame(records)


def meta_table(rows, prompt_id="p", response_id="r"):
    """rows: (judgment_a_id, judgment_b_id, winner 'A' / 'B' / None)."""
    return pd.DataFrame(
        [
            {
                "prompt_id": prompt_id,
                "response_id": response_id,
                "judgment_a_id": a,
                "judgment_b_id": b,
                "winner": w,
                "status": "ok" if w else "no_verdict",
            }
            for a, b, w in rows
        ]
    )


def both_orders(winner, loser):
    """winner beats loser as Judgment A and as Judgment B."""
    return [(winner, loser, "A"), (loser, winner, "B")]


def elo_of(elo):
    return dict(zip(elo["judgment_id"], elo["elo"]))


# --- meta targets ---------------------------------------------------------------------------------
def test_meta_target_is_the_response_with_the_most_variable_valid_scores():
    table = judgments_table(
        [
            ("p1", "r1", "a1", 1.0), ("p1", "r1", "a2", 3.0),  # var 1
            ("p1", "r2", "b1", 0.0), ("p1", "r2", "b2", 4.0), ("p1", "r2", "b3", None),  # var 4 (invalid left out)
            ("p1", "r3", "c1", 0.0),  # one valid judgment: not eligible
            ("p2", "r4", "d1", 2.0), ("p2", "r4", "d2", None), ("p2", "r5", "e1", 5.0),
            ("p3", "r6", "f1", 3.0), ("p3", "r6", "f2", 3.0), ("p3", "r6", "f3", None), ("p3", "r7", "g1", 4.0, "forced"), ("p3", "r7", "g2", 4.0),
        ]
    )
    targets = select_meta_targets(table, 0)
    assert targets.columns.tolist() == ["prompt_id", "response_id", "score_mean", "score_var", "n_valid"]
    assert targets[["prompt_id", "response_id"]].values.tolist() == [["p1", "r2"]]
    assert targets["score_var"].tolist() == [4.0]
    assert targets.attrs["dropped"] == {"fewer_than_2_valid_judgments": 1, "no_score_variance": 1}


def test_forced_scores_count_for_the_meta_target():
    table = judgments_table([("p", "r1", "a", 1.0), ("p", "r1", "b", 5.0, "forced"), ("p", "r2", "c", 2.0), ("p", "r2", "d", 3.0)])
    assert select_meta_targets(table, 0)["response_id"].tolist() == ["r1"]


@PROPERTY
@given(
    st.lists(st.integers(0, 16), min_size=2, max_size=11).filter(lambda v: len(set(v)) > 1),
    st.integers(1, 4),
    st.integers(0, 50),
)
def test_equal_variances_tie_break_by_hash_not_rounding(quarters, shift, seed):
    # r2's scores are r1's shifted by a multiple of 0.25: exactly the same variance.
    scores = [q / 4 for q in quarters]
    shifted = [s + shift / 4 for s in scores]
    if max(shifted) > 5:
        shifted = [s - shift / 4 for s in scores]
    rows = [("p", "r1", f"a{i}", s) for i, s in enumerate(scores)] + [("p", "r2", f"b{i}", s) for i, s in enumerate(shifted)]
    if min(shifted) < 0:
        return
    targets = select_meta_targets(judgments_table(rows), seed)
    assert targets["response_id"].tolist() == [min(["r1", "r2"], key=lambda r: tie_break_key(seed, r))]


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3", "r4"]), st.sampled_from([None, 0.0, 1.0, 2.5, 3.0, 4.75, 5.0])), min_size=1, max_size=30), st.randoms())
def test_meta_targets_do_not_depend_on_row_order(rows, random):
    prompt_of = {"r1": "p1", "r2": "p1", "r3": "p2", "r4": "p2"}
    table = judgments_table([(prompt_of[r], r, f"j{i}", s) for i, (r, s) in enumerate(rows)])
    targets = select_meta_targets(table, 1)
    again = select_meta_targets(table.sample(frac=1, random_state=random.randint(0, 2**31)), 1)
    pd.testing.assert_frame_equal(targets, again)
    assert targets.attrs == again.attrs
    assert len(targets) + sum(targets.attrs["dropped"].values()) == table["prompt_id"].nunique()


# --- plan -------------------------------------------------------------------------------------------
def test_plan_asks_every_ordered_pair_of_the_targets_valid_judgments():
    table = judgments_table(
        [
            ("p", "r", "j3", 4.0), ("p", "r", "j1", 1.0), ("p", "r", "j2", 2.0, "forced"), ("p", "r", "j4", None),
            ("p", "other", "k1", 5.0), ("p", "other", "k2", 0.0),
            ("q", "s", "m1", 1.0), ("q", "s", "m2", 2.0),
        ]
    )
    targets = pd.DataFrame({"prompt_id": ["q", "p"], "response_id": ["s", "r"]})
    plan = plan_comparisons(table, targets)
    assert plan.columns.tolist() == ["prompt_id", "response_id", "judgment_a_id", "judgment_b_id"]
    assert plan.values.tolist() == [
        ["p", "r", a, b] for a, b in itertools.permutations(["j1", "j2", "j3"], 2)
    ] + [["q", "s", "m1", "m2"], ["q", "s", "m2", "m1"]]


def test_plan_size_is_n_times_n_minus_1():
    table = judgments_table([("p", "r", f"j{i:02d}", float(i % 6)) for i in range(11)])
    plan = plan_comparisons(table, pd.DataFrame({"prompt_id": ["p"], "response_id": ["r"]}))
    assert len(plan) == 110
    assert not (plan["judgment_a_id"] == plan["judgment_b_id"]).any()
    assert not plan.duplicated(["judgment_a_id", "judgment_b_id"]).any()


def test_plan_refuses_targets_that_do_not_match_the_judgments():
    table = judgments_table([("p", "r", "j1", 1.0), ("p", "r", "j2", 2.0)])
    with pytest.raises(SchemaError, match="response_id 'r' is listed under prompt_id 'q' but its judgments are under 'p'"):
        plan_comparisons(table, pd.DataFrame({"prompt_id": ["q"], "response_id": ["r"]}))
    with pytest.raises(SchemaError, match="targets: column 'prompt_id' must be unique"):
        plan_comparisons(table, pd.DataFrame({"prompt_id": ["p", "p"], "response_id": ["r", "s"]}))


# --- position weights ------------------------------------------------------------------------------
def test_positional_weights_on_a_skewed_set():
    # Judgment A won 3 times (once forced), Judgment B once, two verdicts undecided:
    # w1 = win_2nd / total = 1/4, w2 = win_1st / total = 3/4.
    table = meta_table([("j1", "j2", "A"), ("j2", "j1", "A"), ("j1", "j3", "A"), ("j3", "j1", "B"), ("j2", "j3", None), ("j3", "j2", None)])
    table.loc[0, "status"] = "forced"
    assert positional_weights(table) == (0.25, 0.75)


def test_positional_weights_without_any_decided_verdict_are_even():
    assert positional_weights(meta_table([("j1", "j2", None), ("j2", "j1", None)])) == (0.5, 0.5)
    empty = meta_table([("j1", "j2", None)]).iloc[:0]
    assert positional_weights(empty) == (0.5, 0.5)


# --- Elo -------------------------------------------------------------------------------------------
def test_elo_of_two_judgments_in_closed_form():
    # j0 beats j1 in both orders: B[0][1] = w1 + w2 = 1. With e0 = -e1 = x the optimum solves
    # 1 - sigmoid(2x) = l2 * x; l2 = sigmoid(-2) makes x = 1: Elo = 1000 +- 400 / ln 10.
    elo = judgment_elo(meta_table(both_orders("j0", "j1")), 0.5, 0.5, l2=sigmoid(-2))
    assert elo.columns.tolist() == list(ELO_COLUMNS)
    assert elo["judgment_id"].tolist() == ["j0", "j1"]
    np.testing.assert_allclose(elo["elo"], [1000 + 400 / math.log(10), 1000 - 400 / math.log(10)], rtol=0, atol=1e-8)


def test_elo_of_a_chain_in_closed_form():
    # j0 beats j1, j1 beats j2 (both orders); j0 and j2 never meet. By symmetry e1 = 0, e0 = -e2 = x
    # with 1 - sigmoid(x) = l2 * x; l2 = sigmoid(-1) makes x = 1.
    elo = judgment_elo(meta_table(both_orders("j0", "j1") + both_orders("j1", "j2")), 0.5, 0.5, l2=sigmoid(-1))
    np.testing.assert_allclose(elo["elo"], [ELO_BASE + ELO_SCALE, ELO_BASE, ELO_BASE - ELO_SCALE], rtol=0, atol=1e-8)


def test_elo_weights_a_win_from_the_disfavoured_slot_more():
    # j0 beat j1 once as Judgment A (weight w1 = 0.25); j2 beat j1 once as Judgment B (weight w2 = 0.75);
    # the other orders gave no verdict. Battle matrix: B[0][1] = 0.25, B[2][1] = 0.75.
    # Both beat j1, but j2's win counts three times as much: Elo order j2 > j0 > j1.
    table = meta_table([("j0", "j1", "A"), ("j1", "j0", None), ("j1", "j2", "B"), ("j2", "j1", None)])
    l2 = 0.05
    elo = elo_of(judgment_elo(table, 0.25, 0.75, l2=l2))
    assert elo["j2"] > elo["j0"] > elo["j1"]
    # First-order conditions of the fit, by hand: d/de_m of sum B log sigmoid(e_m - e_n) - l2/2 |e|^2 = 0.
    e0, e1, e2 = ((elo[j] - ELO_BASE) / ELO_SCALE for j in ("j0", "j1", "j2"))
    assert abs(0.25 * (1 - sigmoid(e0 - e1)) - l2 * e0) < 1e-9
    assert abs(0.75 * (1 - sigmoid(e2 - e1)) - l2 * e2) < 1e-9
    assert abs(-0.25 * sigmoid(e1 - e0) - 0.75 * sigmoid(e1 - e2) - l2 * e1) < 1e-9
    assert abs(e0 + e1 + e2) < 1e-9  # the L2 term centres each target's strengths at 0


def test_a_judgment_that_wins_everything_gets_a_finite_highest_elo():
    rows = [r for other in ("j1", "j2", "j3") for r in both_orders("j0", other)]
    # The others form a cycle: j1 > j2 > j3 > j1.
    rows += both_orders("j1", "j2") + both_orders("j2", "j3") + both_orders("j3", "j1")
    elo = elo_of(judgment_elo(meta_table(rows), 0.5, 0.5))
    assert math.isfinite(elo["j0"]) and elo["j0"] > max(elo["j1"], elo["j2"], elo["j3"]) + 400
    assert max(elo["j1"], elo["j2"], elo["j3"]) - min(elo["j1"], elo["j2"], elo["j3"]) < 1e-6


def test_a_cycle_gives_equal_elo():
    rows = both_orders("j0", "j1") + both_orders("j1", "j2") + both_orders("j2", "j0")
    elo = judgment_elo(meta_table(rows), 0.3, 0.7)
    np.testing.assert_allclose(elo["elo"], ELO_BASE, rtol=0, atol=1e-6)


def test_judgments_without_a_decided_comparison_get_no_elo():
    rows = both_orders("j0", "j1") + [("j0", "j2", None), ("j2", "j0", None)]
    assert sorted(judgment_elo(meta_table(rows), 0.5, 0.5)["judgment_id"]) == ["j0", "j1"]
    nothing = judgment_elo(meta_table([("j0", "j1", None)]), 0.5, 0.5)
    assert nothing.empty and nothing.columns.tolist() == list(ELO_COLUMNS)


def test_each_target_is_fitted_independently_of_the_batch():
    small = meta_table(both_orders("a0", "a1") + [("a1", "a2", "A")], "p1", "r1")
    large_rows = [(f"b{i}", f"b{j}", "A" if (i * 7 + j) % 3 else "B") for i in range(9) for j in range(9) if i != j]
    large = meta_table(large_rows, "p2", "r2")
    alone = judgment_elo(small, 0.4, 0.6)
    together = judgment_elo(pd.concat([large, small], ignore_index=True), 0.4, 0.6)
    mine = together[together["response_id"] == "r1"].reset_index(drop=True)
    np.testing.assert_allclose(mine["elo"], alone["elo"], rtol=0, atol=1e-8)
    assert together["prompt_id"].tolist() == ["p1"] * 3 + ["p2"] * 9


def test_elo_arguments_are_checked():
    table = meta_table(both_orders("j0", "j1"))
    with pytest.raises(SchemaError, match="l2 must be a finite number > 0, got 0"):
        judgment_elo(table, 0.5, 0.5, l2=0)
    with pytest.raises(SchemaError, match="w1 must be a finite number >= 0, got nan"):
        judgment_elo(table, float("nan"), 0.5)
    with pytest.raises(SchemaError, match="missing column\\(s\\) 'winner'"):
        judgment_elo(table.drop(columns="winner"), 0.5, 0.5)


@st.composite
def tournaments(draw):
    n = draw(st.integers(2, 7))
    ids = [f"j{i}" for i in range(n)]
    rows = [(a, b, draw(st.sampled_from(["A", "B", None]))) for a, b in itertools.permutations(ids, 2)]
    weights = draw(st.sampled_from([(0.5, 0.5), (0.2, 0.8), (0.9, 0.1), (0.0, 1.0)]))
    return ids, rows, weights


def battle_matrix(ids, rows, w1, w2):
    index = {j: i for i, j in enumerate(ids)}
    battles = np.zeros((len(ids), len(ids)))
    for a, b, winner in rows:
        if winner == "A":
            battles[index[a], index[b]] += w1
        elif winner == "B":
            battles[index[b], index[a]] += w2
    return battles


@PROPERTY
@given(tournaments(), st.randoms())
def test_elo_properties(tournament, random):
    ids, rows, (w1, w2) = tournament
    table = meta_table(rows)
    elo = elo_of(judgment_elo(table, w1, w2))
    battles = battle_matrix(ids, rows, w1, w2)
    took_part = [j for i, j in enumerate(ids) if any(r[2] and j in r[:2] for r in rows)]
    assert sorted(elo) == sorted(took_part)
    # Dominance: if m wins at least as much as n against everyone and loses at most as much,
    # the fit must rank m at least as high as n.
    index = {j: i for i, j in enumerate(ids)}
    for m, n in itertools.permutations(took_part, 2):
        i, k = index[m], index[n]
        others = [o for o in range(len(ids)) if o not in (i, k)]
        if (
            all(battles[i, o] >= battles[k, o] and battles[o, i] <= battles[o, k] for o in others)
            and battles[i, k] >= battles[k, i]
        ):
            assert elo[m] >= elo[n] - 1e-6
    # Stationarity: the gradient of the objective vanishes at the fitted strengths.
    e = np.array([(elo.get(j, ELO_BASE) - ELO_BASE) / ELO_SCALE for j in ids])
    p = 1 / (1 + np.exp(-(e[:, None] - e[None, :])))
    gradient = (battles * (1 - p)).sum(axis=1) - (battles.T * p).sum(axis=1) - 0.01 * e
    assert np.abs(gradient).max() < 1e-7
    # Row order does not matter.
    again = elo_of(judgment_elo(table.sample(frac=1, random_state=random.randint(0, 2**31)), w1, w2))
    assert again.keys() == elo.keys()
    assert all(abs(again[j] - elo[j]) < 1e-8 for j in elo)


# --- judge pairs ------------------------------------------------------------------------------------
PROMPTS = pd.DataFrame({"prompt_id": ["p", "q"], "prompt": ["What is 2+2?", "Name a colour."]})
RESPONSES = pd.DataFrame({"response_id": ["r", "s"], "response": ["4", "Blue"]})


def judge_inputs(texts=None, scores=None):
    ids = ["j0", "j1", "j2"]
    texts = texts or {j: f"Rationale of {j}. Score: 3" for j in ids}
    scores = scores or {"j0": 4.0, "j1": 3.0, "j2": 1.0}
    judgments = pd.DataFrame({"judgment_id": ids, "judgment": [texts[j] for j in ids], "score": [scores[j] for j in ids]})
    targets = pd.DataFrame({"prompt_id": ["p"], "response_id": ["r"]})
    return judgments, targets


CHAIN = both_orders("j0", "j1") + both_orders("j1", "j2")


def test_judge_pair_is_highest_versus_lowest_elo():
    judgments, targets = judge_inputs()
    elo = judgment_elo(meta_table(CHAIN), 0.5, 0.5)
    pairs = select_judge_pairs(elo, targets=targets, judgments=judgments, responses=RESPONSES, prompts=PROMPTS)
    assert pairs.columns.tolist() == list(PAIRS_COLUMNS)
    row = pairs.iloc[0]
    assert (row["kind"], row["prompt_id"], row["chosen_id"], row["rejected_id"]) == ("judge", "p", "j0", "j2")
    assert row["prompt"] == render_judge_prompt("What is 2+2?", "4")
    assert (row["chosen"], row["rejected"]) == ("Rationale of j0. Score: 3", "Rationale of j2. Score: 3")
    assert (row["chosen_score"], row["rejected_score"]) == (4.0, 1.0)  # the judgments' own scores
    assert (row["chosen_chars"], row["rejected_chars"]) == (len(row["chosen"]), len(row["rejected"]))
    assert row["chosen_elo"] == elo["elo"].max() and row["rejected_elo"] == elo["elo"].min()
    assert pairs.attrs["dropped"] == dict.fromkeys(JUDGE_DROP_REASONS, 0)


def test_judge_pair_edge_rules_are_counted():
    judgments = pd.DataFrame(
        {
            "judgment_id": ["a0", "a1", "b0", "b1", "c0", "c1", "c2", "d0", "d1", "e0", "e1", "f0", "f1"],
            "judgment": ["x", "y", "x", "y", "same", "mid", "same", "long" * 10, "y", "x", "y", "x", "y"],
            "score": [4.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 4.0, 1.0, 3.0, 3.0, 5.0, 3.0],
        }
    )
    meta = pd.concat(
        [
            meta_table([("a0", "a1", None), ("a1", "a0", None)], "pa", "ra"),  # no decided verdict
            meta_table([("b0", "b1", "A"), ("b1", "b0", "A")], "pb", "rb"),  # each wins once as A: equal Elo
            meta_table(both_orders("c0", "c1") + both_orders("c1", "c2"), "pc", "rc"),  # chosen and rejected texts equal
            meta_table(both_orders("d0", "d1"), "pd", "rd"),  # chosen judgment of 40 characters
            meta_table(both_orders("e0", "e1"), "pe", "re"),  # same score 3.0 / 3.0
            meta_table(both_orders("f0", "f1"), "pf", "rf"),  # kept
        ],
        ignore_index=True,
    )
    targets = pd.DataFrame({"prompt_id": ["pa", "pb", "pc", "pd", "pe", "pf"], "response_id": ["ra", "rb", "rc", "rd", "re", "rf"]})
    prompts = pd.DataFrame({"prompt_id": targets["prompt_id"], "prompt": "Q"})
    responses = pd.DataFrame({"response_id": targets["response_id"], "response": "R"})
    elo = judgment_elo(meta, *positional_weights(meta))
    kwargs = dict(targets=targets, judgments=judgments, responses=responses, prompts=prompts, max_chosen_chars=39)

    strict = select_judge_pairs(elo, require_distinct_scores=True, **kwargs)
    assert strict["prompt_id"].tolist() == ["pf"]
    assert strict.attrs["dropped"] == {
        "no_decided_comparison": 1,
        "elo_all_equal": 1,
        "same_text": 1,
        "chosen_judgment_too_long": 1,
        "same_score": 1,
    }
    lenient = select_judge_pairs(elo, **kwargs)  # distinct scores are an option, off by default
    assert lenient["prompt_id"].tolist() == ["pe", "pf"]
    assert lenient.attrs["dropped"]["same_score"] == 0
    assert len(lenient) + sum(lenient.attrs["dropped"].values()) == len(targets)


def test_elo_ties_at_the_top_and_bottom_break_by_hash():
    # t0 and t1 each beat both u0 and u1 in both orders; t0/t1 and u0/u1 split (each wins once as A).
    rows = [r for t in ("t0", "t1") for u in ("u0", "u1") for r in both_orders(t, u)]
    rows += [("t0", "t1", "A"), ("t1", "t0", "A"), ("u0", "u1", "A"), ("u1", "u0", "A")]
    elo = judgment_elo(meta_table(rows), 0.5, 0.5)
    judgments = pd.DataFrame({"judgment_id": ["t0", "t1", "u0", "u1"], "judgment": ["a", "b", "c", "d"], "score": [5.0, 5.0, 1.0, 1.0]})
    targets = pd.DataFrame({"prompt_id": ["p"], "response_id": ["r"]})
    seen = set()
    for seed in range(12):
        pairs = select_judge_pairs(elo, targets=targets, judgments=judgments, responses=RESPONSES, prompts=PROMPTS, seed=seed)
        assert pairs["chosen_id"].iloc[0] == min(["t0", "t1"], key=lambda j: tie_break_key(seed, j))
        assert pairs["rejected_id"].iloc[0] == min(["u0", "u1"], key=lambda j: tie_break_key(seed, j))
        seen.add(pairs["chosen_id"].iloc[0])
    assert seen == {"t0", "t1"}


def test_judge_pair_inputs_are_checked():
    judgments, targets = judge_inputs()
    elo = judgment_elo(meta_table(CHAIN), 0.5, 0.5)
    common = dict(judgments=judgments, responses=RESPONSES, prompts=PROMPTS)
    with pytest.raises(SchemaError, match="elo: response_id 'r' is not a meta-judge target"):
        select_judge_pairs(elo, targets=pd.DataFrame({"prompt_id": ["q"], "response_id": ["s"]}), **common)
    with pytest.raises(SchemaError, match="judgments: no row for judgment_id 'j0'"):
        select_judge_pairs(elo, targets=targets, judgments=judgments.iloc[1:], responses=RESPONSES, prompts=PROMPTS)
    with pytest.raises(SchemaError, match="prompts: missing column\\(s\\) 'prompt'"):
        select_judge_pairs(elo, targets=targets, judgments=judgments, responses=RESPONSES, prompts=PROMPTS[["prompt_id"]])
    with pytest.raises(SchemaError, match="judgments: column 'judgment_id' must be unique; 'j0' occurs on 2 rows"):
        select_judge_pairs(elo, targets=targets, judgments=pd.concat([judgments, judgments.iloc[:1]]), responses=RESPONSES, prompts=PROMPTS)
    with pytest.raises(SchemaError, match="responses: no text for 'r'"):
        select_judge_pairs(elo, targets=targets, judgments=judgments, responses=RESPONSES.iloc[1:], prompts=PROMPTS)


def test_empty_tables_flow_through_every_step():
    judgments = judgments_table([("p", "r", "j", 1.0)]).iloc[:0]
    targets = select_meta_targets(judgments, 0)
    assert targets.empty and targets.attrs["dropped"] == {"fewer_than_2_valid_judgments": 0, "no_score_variance": 0}
    assert plan_comparisons(judgments, targets).empty
    meta = meta_table([("a", "b", None)]).iloc[:0]
    elo = judgment_elo(meta, *positional_weights(meta))
    pairs = select_judge_pairs(elo, targets=targets, judgments=judgments, responses=RESPONSES, prompts=PROMPTS)
    assert pairs.empty and pairs.columns.tolist() == list(PAIRS_COLUMNS)
    assert pairs.attrs["dropped"] == dict.fromkeys(JUDGE_DROP_REASONS, 0)


def test_an_unconverged_fit_raises_naming_the_target():
    rows = [r for other in ("j1", "j2", "j3") for r in both_orders("j0", other)]
    with pytest.raises(RuntimeError, match="did not converge in 1 Newton steps for 1 target\\(s\\) \\(first: response_id 'r'\\)"):
        judgment_elo(meta_table(rows), 0.5, 0.5, max_iterations=1)


@PROPERTY
@given(tournaments(), st.integers(0, 5), st.randoms())
def test_judge_pairs_do_not_depend_on_row_order(tournament, seed, random):
    ids, rows, (w1, w2) = tournament
    table = meta_table(rows)
    judgments = pd.DataFrame({"judgment_id": ids, "judgment": [f"text {j}" for j in ids], "score": [float(i % 3) for i in range(len(ids))]})
    targets = pd.DataFrame({"prompt_id": ["p"], "response_id": ["r"]})
    common = dict(targets=targets, responses=RESPONSES, prompts=PROMPTS, seed=seed)
    pairs = select_judge_pairs(judgment_elo(table, w1, w2), judgments=judgments, **common)
    state = random.randint(0, 2**31)
    shuffled_elo = judgment_elo(table.sample(frac=1, random_state=state), w1, w2).sample(frac=1, random_state=state)
    again = select_judge_pairs(shuffled_elo, judgments=judgments.sample(frac=1, random_state=state), **common)
    pd.testing.assert_frame_equal(pairs, again)
    assert pairs.attrs == again.attrs
    assert len(pairs) + sum(pairs.attrs["dropped"].values()) == 1
    if len(pairs):
        elo = elo_of(judgment_elo(table, w1, w2))
        assert max(elo.values()) - pairs["chosen_elo"].iloc[0] <= 1e-6  # highest Elo, up to the tie tolerance
        assert pairs["rejected_elo"].iloc[0] - min(elo.values()) <= 1e-6
        assert pairs["chosen_elo"].iloc[0] > pairs["rejected_elo"].iloc[0]

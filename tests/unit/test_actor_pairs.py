"""Actor pairs with length control: the spec's rules by hand, then properties."""

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.hashing import tie_break_key
from metareward.pairs import ACTOR_DROP_REASONS, TIER_TOLERANCE, drop_duplicate_responses, select_actor_pairs
from metareward.schema import PAIRS_COLUMNS, SchemaError


def _responses(rows, prompt="Why?"):
    """rows: (prompt_id, response_id, text, score[, n_tokens])."""
    table = pd.DataFrame(
        [
            {"prompt_id": r[0], "response_id": r[1], "response": r[2], "score": r[3], "n_tokens": r[4] if len(r) > 4 else 1}
            for r in rows
        ]
    )
    return table.assign(prompt=table["prompt_id"].map(lambda p: f"{prompt} ({p})"))


# One prompt, S_max = 5, S_min = 0 (lengths in characters in brackets):
#   a 5.0 [30]  b 4.0 [10]  c 3.0 [5]  f 2.0 [60]  d 1.0 [40]  e 0.0 [20]  u unscored [1]
LADDER = _responses(
    [
        ("p", "a", "a" * 30, 5.0),
        ("p", "b", "b" * 10, 4.0),
        ("p", "c", "c" * 5, 3.0),
        ("p", "f", "f" * 60, 2.0),
        ("p", "d", "d" * 40, 1.0),
        ("p", "e", "e" * 20, 0.0),
        ("p", "u", "u", None),
    ]
)


@pytest.mark.parametrize(
    ("rho", "chosen", "rejected"),
    [
        # rho = 0: plain Self-Rewarding, best vs worst.
        (0.0, "a", "e"),
        # top: S >= 0.8*5 = 4 -> {a, b}, shortest b; bottom: S <= 0.2*5 = 1 -> {d, e}, longest d.
        (0.2, "b", "d"),
        # top: S >= 0.6*5 = 3 -> {a, b, c} (c on the bound), shortest c;
        # bottom: S <= 0.4*5 = 2 -> {f, d, e} (f on the bound), longest f.
        (0.4, "c", "f"),
        # top: S >= 2.55 -> {a, b, c}; bottom: S <= 2.45 -> {f, d, e}.
        (0.49, "c", "f"),
    ],
)
def test_tiers_at_several_rho(rho, chosen, rejected):
    pairs = select_actor_pairs(LADDER, rho)
    assert pairs.columns.tolist() == list(PAIRS_COLUMNS)
    assert pairs[["chosen_id", "rejected_id"]].values.tolist() == [[chosen, rejected]]
    row = pairs.iloc[0]
    assert row["kind"] == "actor"
    assert row["prompt"] == "Why? (p)"
    assert row["chosen"] == chosen * len(row["chosen"]) and row["rejected"] == rejected * len(row["rejected"])
    assert (row["chosen_score"], row["rejected_score"]) == (
        LADDER.set_index("response_id").loc[chosen, "score"],
        LADDER.set_index("response_id").loc[rejected, "score"],
    )
    assert (row["chosen_chars"], row["rejected_chars"]) == (len(row["chosen"]), len(row["rejected"]))
    assert pd.isna(row["chosen_elo"]) and pd.isna(row["rejected_elo"])
    assert pairs.attrs["dropped"] == dict.fromkeys(ACTOR_DROP_REASONS, 0)


def test_rho_zero_is_best_versus_worst_whatever_the_lengths():
    table = _responses([("p", "best", "x" * 100, 4.5), ("p", "mid", "x", 3.0), ("p", "worst", "x" * 2, 1.0)])
    assert select_actor_pairs(table, 0)[["chosen_id", "rejected_id"]].values.tolist() == [["best", "worst"]]


def test_tokens_can_measure_length():
    # By characters "long" is longer; by tokens it is shorter.
    table = _responses([("p", "long", "x" * 50, 5.0, 3), ("p", "short", "x" * 5, 5.0, 9), ("p", "low", "y", 1.0, 1)])
    assert select_actor_pairs(table, 0.0)["chosen_id"].tolist() == ["short"]
    assert select_actor_pairs(table, 0.0, length="tokens")["chosen_id"].tolist() == ["long"]


def test_equal_lengths_are_broken_by_the_seeded_hash():
    table = _responses([("p", f"t{i}", f"top{i}", 5.0) for i in range(6)] + [("p", f"b{i}", f"bot{i}", 1.0) for i in range(6)])
    for seed in (0, 1, 2, 3):
        pairs = select_actor_pairs(table, 0.0, seed=seed)
        assert pairs["chosen_id"].iloc[0] == min((f"t{i}" for i in range(6)), key=lambda r: tie_break_key(seed, r))
        assert pairs["rejected_id"].iloc[0] == min((f"b{i}" for i in range(6)), key=lambda r: tie_break_key(seed, r))
    chosen = {select_actor_pairs(table, 0.0, seed=seed)["chosen_id"].iloc[0] for seed in range(20)}
    assert len(chosen) > 1  # the seed matters


def test_each_skip_rule_is_counted():
    table = _responses(
        [
            ("one_valid", "o1", "x", 4.0),
            ("one_valid", "o2", "y", None),
            ("no_valid", "n1", "x", None),
            ("equal", "e1", "x", 3.0),
            ("equal", "e2", "yy", 3.0),
            ("same_text", "s1", "same", 5.0),
            ("same_text", "s2", "same", 1.0),
            # Tiers overlap within TIER_TOLERANCE: the shorter (chosen) one scores lower.
            ("not_better", "nb1", "x", 1.0),
            ("not_better", "nb2", "xx", 1.0 + TIER_TOLERANCE / 10),
            ("long", "l1", "x" * 31, 5.0),
            ("long", "l2", "x", 1.0),
            ("kept", "k1", "x" * 30, 5.0),
            ("kept", "k2", "x", 1.0),
        ]
    )
    pairs = select_actor_pairs(table, 0.0, max_chosen_chars=30)
    assert pairs["prompt_id"].tolist() == ["kept"]
    assert pairs.attrs["dropped"] == {
        "fewer_than_2_scored": 2,
        "all_scores_equal": 1,
        "same_text": 1,
        "chosen_not_better": 1,
        "chosen_too_long": 1,
    }
    assert len(pairs) + sum(pairs.attrs["dropped"].values()) == table["prompt_id"].nunique()


def test_prompt_texts_can_come_from_a_prompts_table():
    table = _responses([("p", "a", "x", 5.0), ("p", "b", "y", 1.0)]).drop(columns="prompt")
    prompts = pd.DataFrame({"prompt_id": ["p", "other"], "prompt": ["The question", "Unused"]})
    assert select_actor_pairs(table, 0, prompts=prompts)["prompt"].tolist() == ["The question"]
    with pytest.raises(SchemaError, match="missing column 'prompt'; pass prompts="):
        select_actor_pairs(table, 0)
    with pytest.raises(SchemaError, match="no prompt text for prompt_id 'p'"):
        select_actor_pairs(table, 0, prompts=prompts.iloc[1:])


@pytest.mark.parametrize("rho", [-0.01, 0.5, 1.0])
def test_bad_rho_is_named(rho):
    with pytest.raises(SchemaError, match=f"got {rho!r}"):
        select_actor_pairs(LADDER, rho)


def test_bad_input_is_named():
    with pytest.raises(SchemaError, match="missing column\\(s\\) 'score'"):
        select_actor_pairs(LADDER.drop(columns="score"), 0.1)
    with pytest.raises(SchemaError, match="'response_id' must be unique; 'a' occurs on 2 rows"):
        select_actor_pairs(pd.concat([LADDER, LADDER.iloc[:1]]), 0.1)
    with pytest.raises(SchemaError, match="length must be 'chars' or 'tokens', got 'words'"):
        select_actor_pairs(LADDER, 0.1, length="words")
    with pytest.raises(SchemaError, match="missing column\\(s\\) 'n_tokens'"):
        select_actor_pairs(LADDER.drop(columns="n_tokens"), 0.1, length="tokens")
    with pytest.raises(SchemaError, match="max_chosen_chars must be a non-negative int or None, got -5"):
        select_actor_pairs(LADDER, 0.1, max_chosen_chars=-5)


def test_drop_duplicate_responses_keeps_one_per_text_by_hash():
    table = _responses([("p", "r1", "same", 1.0), ("p", "r2", "same", 2.0), ("p", "r3", "other", 3.0), ("q", "r4", "same", 1.0)])
    kept = drop_duplicate_responses(table, seed=5)
    survivor = min(["r1", "r2"], key=lambda r: tie_break_key(5, r))
    assert kept["response_id"].tolist() == [r for r in ["r1", "r2", "r3", "r4"] if r in (survivor, "r3", "r4")]
    assert kept.attrs["dropped"] == {"duplicate_text": 1}
    reversed_kept = drop_duplicate_responses(table.iloc[::-1], seed=5)
    assert sorted(reversed_kept["response_id"]) == sorted(kept["response_id"])


# --- properties ----------------------------------------------------------------------------------
TEXTS = ["a", "bb", "cc", "ddd", "eeee", "same", "x y z", "fffff"]
SCORES = [None, 0.0, 1.0, 2.0, 2.5, 3.0, 3.25, 4.0, 4.75, 5.0]


@st.composite
def response_tables(draw):
    n = draw(st.integers(1, 24))
    rows = [
        (
            draw(st.sampled_from(["p0", "p1", "p2", "p3"])),
            f"r{i}",
            draw(st.sampled_from(TEXTS)),
            draw(st.one_of(st.sampled_from(SCORES), st.floats(0, 5))),
        )
        for i in range(n)
    ]
    return _responses(rows)


def _oracle(table, rho, seed, cap):
    """The spec's rules per prompt, written plainly."""
    result, dropped = {}, dict.fromkeys(ACTOR_DROP_REASONS, 0)
    for prompt_id, group in table.groupby("prompt_id"):
        scored = [r for r in group.itertuples() if not pd.isna(r.score)]
        if len(scored) < 2:
            dropped["fewer_than_2_scored"] += 1
            continue
        s_max, s_min = max(r.score for r in scored), min(r.score for r in scored)
        if s_max == s_min:
            dropped["all_scores_equal"] += 1
            continue
        top = [r for r in scored if r.score >= (1 - rho) * s_max + rho * s_min - TIER_TOLERANCE]
        bottom = [r for r in scored if r.score <= (1 - rho) * s_min + rho * s_max + TIER_TOLERANCE]
        chosen = min(top, key=lambda r: (len(r.response), tie_break_key(seed, r.response_id)))
        rejected = min(bottom, key=lambda r: (-len(r.response), tie_break_key(seed, r.response_id)))
        if chosen.response == rejected.response:
            dropped["same_text"] += 1
        elif chosen.score <= rejected.score:
            dropped["chosen_not_better"] += 1
        elif cap is not None and len(chosen.response) > cap:
            dropped["chosen_too_long"] += 1
        else:
            result[prompt_id] = (chosen.response_id, rejected.response_id)
    return result, dropped


@settings(deadline=None, max_examples=150)
@given(response_tables(), st.floats(0, 0.4999), st.integers(0, 3), st.sampled_from([None, 2, 4]), st.randoms())
def test_actor_pair_properties(table, rho, seed, cap, random):
    pairs = select_actor_pairs(table, rho, seed=seed, max_chosen_chars=cap)
    by_id = table.set_index("response_id")
    for row in pairs.itertuples():
        group = table[(table["prompt_id"] == row.prompt_id) & table["score"].notna()]
        s_max, s_min = group["score"].max(), group["score"].min()
        top = group[group["score"] >= (1 - rho) * s_max + rho * s_min - TIER_TOLERANCE]
        bottom = group[group["score"] <= (1 - rho) * s_min + rho * s_max + TIER_TOLERANCE]
        # chosen: in the top tier and the shortest there; rejected: bottom tier, the longest there.
        assert row.chosen_id in set(top["response_id"])
        assert len(row.chosen) == top["response"].str.len().min()
        assert row.rejected_id in set(bottom["response_id"])
        assert len(row.rejected) == bottom["response"].str.len().max()
        assert row.chosen_score > row.rejected_score
        assert row.chosen_score == by_id.loc[row.chosen_id, "score"]
        assert row.chosen != row.rejected
    # Every prompt is accounted for, and the plain per-prompt rules agree.
    assert len(pairs) + sum(pairs.attrs["dropped"].values()) == table["prompt_id"].nunique()
    expected, dropped = _oracle(table, rho, seed, cap)
    assert dict(zip(pairs["prompt_id"], zip(pairs["chosen_id"], pairs["rejected_id"]))) == expected
    assert pairs.attrs["dropped"] == dropped
    # Row order does not matter.
    shuffled = table.sample(frac=1, random_state=random.randint(0, 2**31)).reset_index(drop=True)
    again = select_actor_pairs(shuffled, rho, seed=seed, max_chosen_chars=cap)
    pd.testing.assert_frame_equal(pairs, again)
    assert again.attrs == pairs.attrs

"""The per-response score table."""

import math

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.scoring import response_scores


def _judgments(rows):
    return pd.DataFrame(
        [
            {"prompt_id": p, "response_id": r, "judgment_id": f"j{i}", "score": s, "status": status}
            for i, (p, r, s, status) in enumerate(rows)
        ]
    )


def test_mean_population_variance_and_count_of_valid_judgments():
    table = response_scores(
        _judgments(
            [
                ("p1", "r1", 1.0, "ok"),
                ("p1", "r1", 3.0, "ok"),
                ("p1", "r1", 5.0, "forced"),  # forced verdicts count
                ("p1", "r1", None, "no_score"),  # invalid ones do not
                ("p1", "r2", None, "out_of_range"),
                ("p2", "r3", 4.5, "ok"),
            ]
        )
    )
    assert table.columns.tolist() == ["prompt_id", "response_id", "score_mean", "score_var", "n_valid"]
    assert table["response_id"].tolist() == ["r1", "r2", "r3"]
    assert table["n_valid"].tolist() == [3, 0, 1]
    assert table["score_mean"].iloc[0] == 3.0
    assert table["score_var"].iloc[0] == 8 / 3  # ((1-3)^2 + 0 + (5-3)^2) / 3, ddof 0
    assert math.isnan(table["score_mean"].iloc[1]) and math.isnan(table["score_var"].iloc[1])
    assert (table["score_mean"].iloc[2], table["score_var"].iloc[2]) == (4.5, 0.0)


def test_equal_scores_have_exactly_zero_variance():
    # 0.1 is not a binary fraction: a plain two-pass variance could leave ~1e-33 here.
    table = response_scores(_judgments([("p", "r", 0.1, "ok")] * 7))
    assert table["score_var"].iloc[0] == 0.0


scores = st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 1.0, 2.5, 4.75, 5.0]), st.floats(0, 5))


@settings(deadline=None)  # shared CPUs: timings vary too much for a per-example deadline
@given(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]), scores), min_size=1, max_size=30), st.randoms())
def test_scores_do_not_depend_on_row_order(rows, random):
    table = _judgments(
        [({"r1": "p1", "r2": "p1", "r3": "p2"}[r], r, s, "ok" if s is not None else "no_score") for r, s in rows]
    )
    shuffled = table.sample(frac=1, random_state=random.randint(0, 2**31))
    a, b = response_scores(table), response_scores(shuffled)
    pd.testing.assert_frame_equal(a, b)
    for response_id, group in table.groupby("response_id"):
        valid = group["score"].dropna().to_numpy()
        row = a.set_index("response_id").loc[response_id]
        assert row["n_valid"] == len(valid)
        if len(valid):
            assert np.isclose(row["score_mean"], valid.mean(), rtol=1e-12, atol=1e-12)
            assert np.isclose(row["score_var"], valid.var(), rtol=1e-9, atol=1e-12)

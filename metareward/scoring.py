"""The per-response score table: mean, population variance and count of the valid judgments.

Valid judgments are those with status ok or forced (forced verdicts count everywhere). Every
response that has at least one judgment row gets a row; one without a valid judgment has
n_valid 0 and null mean and variance.

The arithmetic does not depend on row order, and ties stay ties: mean = sum / n and variance =
(n * sum of squares - sum^2) / n^2, with the sums taken in ascending order of score. For the
scores judges write (integers, halves, quarters) the sums are exact, so each mean and variance is
the correctly rounded true value, and two responses whose true variances are equal get equal
floats (the meta-judge target rule then breaks the tie by hash, not by rounding noise). A response
whose valid scores are all equal has variance exactly 0 (the target rule tests variance > 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metareward.schema import (
    N_VALID,
    PROMPT_ID,
    RESPONSE_ID,
    SCORE,
    SCORE_MEAN,
    SCORE_VAR,
    SCORES_COLUMNS,
    STATUS,
    VALID_STATUSES,
    check_judgments,
)


def response_scores(judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per response of `judgments` (prompt_id, response_id, judgment_id, score, status):
    prompt_id, response_id, score_mean, score_var (ddof 0), n_valid; sorted by prompt_id,
    response_id."""
    check_judgments(judgments)
    responses = judgments[[PROMPT_ID, RESPONSE_ID]].drop_duplicates(RESPONSE_ID)
    responses = responses.sort_values([PROMPT_ID, RESPONSE_ID], ignore_index=True)

    valid = judgments.loc[judgments[STATUS].isin(VALID_STATUSES).to_numpy(), [RESPONSE_ID, SCORE]]
    codes = pd.Index(responses[RESPONSE_ID]).get_indexer(valid[RESPONSE_ID])
    scores = valid[SCORE].to_numpy(dtype=np.float64)
    order = np.lexsort((scores, codes))
    codes, scores = codes[order], scores[order]

    n_responses = len(responses)
    n_valid = np.bincount(codes, minlength=n_responses)
    has_valid = n_valid > 0
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.empty(0, dtype=np.intp)
    mean = np.full(n_responses, np.nan)
    var = np.full(n_responses, np.nan)
    if len(codes):
        count = n_valid[has_valid]
        total = np.add.reduceat(scores, starts)
        total_of_squares = np.add.reduceat(scores * scores, starts)
        # Sums of integer, half and quarter scores are exact, so mean and variance are the correctly
        # rounded true values: responses with equal true variance compare equal (and tie-break by hash).
        group_var = np.maximum(count * total_of_squares - total * total, 0.0) / (count * count)
        # Sorted scores: all equal exactly when first == last; then the variance is exactly 0.
        group_var[scores[starts] == scores[starts + count - 1]] = 0.0
        mean[has_valid] = total / count
        var[has_valid] = group_var

    table = responses.assign(**{SCORE_MEAN: mean, SCORE_VAR: var, N_VALID: n_valid.astype(np.int64)})
    return table[list(SCORES_COLUMNS)]

"""The library and the bench's plain per-prompt implementation choose the same pairs (small scale).

The full-scale run is `bench/bookkeeping.py`; this keeps the cross-check in the test suite.
"""

from bench.bookkeeping import (
    Timer,
    compare,
    fast_first_half,
    fast_second_half,
    make_meta_judgments,
    make_tables,
    reference_first_half,
    reference_second_half,
)


def test_fast_and_per_prompt_bookkeeping_agree():
    prompts, responses, judgments = make_tables(60, seed=3)
    fast = fast_first_half(prompts, responses, judgments, Timer())
    meta_texts = make_meta_judgments(fast["plan"], fast["judgments"], responses, seed=3)
    fast |= fast_second_half(prompts, responses, fast["judgments"], fast["targets"], meta_texts, Timer())
    reference = reference_first_half(prompts, responses, judgments, Timer())
    reference |= reference_second_half(prompts, responses, reference["judgments"], reference["targets"], meta_texts, Timer())

    agreement = compare(fast, reference)
    assert agreement["elo_gap"] < 1e-3
    # The synthetic set exercises the selection: most prompts give both kinds of pair, some are dropped.
    assert 30 < len(fast["actor_pairs"]) < 60
    assert 30 < len(fast["judge_pairs"]) <= 60
    assert sum(fast["judge_pairs"].attrs["dropped"].values()) + len(fast["judge_pairs"]) == len(fast["targets"])
    statuses = set(fast["judgments"]["status"])
    assert {"ok", "no_score", "out_of_range"} <= statuses

"""Parsing of judge and meta-judge texts, hostile inputs included, and the forced-mode cut."""

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.parsing import (
    complete_verdict,
    cut_before_verdict,
    parse_score,
    parse_scores,
    parse_winner,
    parse_winners,
)
from metareward.prompts import SCORE_OPTIONS, WINNER_OPTIONS, WINNER_OF_OPTION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is relevant.\nScore: 4", 4.0),
        ("Score: 4.75", 4.75),
        ("Score: 5.0", 5.0),
        ("Score: 0", 0.0),
        ("Score: 7", None),
        ("Score: -1", None),
        ("Score: 5.01", None),
        ("", None),
        (None, None),
        ("No verdict at all.", None),
        ("Score: <total points>", None),
        # Several scores: the judge's last one counts, even when it is lower or out of range.
        ("Draft Score: 5. On reflection...\nScore: 2", 2.0),
        ("Score: 3\nWait, that is wrong. Score: 9", None),
        # A later "Score:" without a number does not hide the last numbered one.
        ("Score: 3\nThe format is Score: <total points>", 3.0),
        ("**Score:** 4", 4.0),
        ("**Score**: 3.5", 3.5),
        ("score: 2", 2.0),
        ("SCORE:\n1", 1.0),
        ("Score: 4/5", 4.0),
        ("Score: 4.", 4.0),
        ("Score: +3", 3.0),
        ("Final score: 3 points", 3.0),
        # Not the word "score": no match.
        ("Underscore: 4", None),
        # Non-ASCII digits and Unicode case folding do not count.
        ("Score: \u0664", None),
        ("\u017fcore: 4", None),
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_range_is_configurable():
    assert parse_score("Score: 7", low=1, high=10) == 7.0
    assert parse_score("Score: 0", low=1, high=10) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Judgment A is closer to the rubric.\nWinner: Judgement A", "A"),
        ("Winner: Judgement B", "B"),
        ("Winner: Judgment B.", "B"),
        ("Winner: Judgment A", "A"),
        ("**Winner: Judgement A**", "A"),
        ("Winner: [Judgement B]", "B"),
        ("winner: judgement b", "B"),
        ("Winner:\n\nJudgement A", "A"),
        ("Winner: Judgement C", None),
        ("Winner: Judgement AB", None),
        ("Winner: [Judgement A | Judgement B]", None),
        ("Winner: A", None),
        ("Winner: Judgement B. Judgement B applies the rubric better.", "B"),
        ("", None),
        (None, None),
        ("Judgement A is better.", None),
        # The last Winner line counts.
        ("Winner: Judgement A\nOn second thought:\nWinner: Judgement B", "B"),
        ("Winner: Judgement A\nOn second thought:\nWinner: Judgement C", None),
    ],
)
def test_parse_winner(text, expected):
    assert parse_winner(text) == expected


def test_parse_scores_gives_value_and_status_on_the_input_index():
    texts = pd.Series(["Score: 4", "Score: 9", None, "nothing", "Score: -1", "Score: 2.5"], index=[10, 11, 12, 13, 14, 15])
    parsed = parse_scores(texts)
    assert list(parsed.index) == [10, 11, 12, 13, 14, 15]
    assert parsed["status"].tolist() == ["ok", "out_of_range", "no_score", "no_score", "out_of_range", "ok"]
    assert parsed["score"].tolist()[0] == 4.0 and parsed["score"].tolist()[5] == 2.5
    assert parsed["score"].isna().tolist() == [False, True, True, True, True, False]


def test_parse_winners_gives_value_and_status():
    texts = pd.Series(["Winner: Judgement A", "Winner: Judgment B.", "Winner: Judgement C", ""])
    parsed = parse_winners(texts)
    assert parsed["winner"].tolist()[:2] == ["A", "B"]
    assert parsed["winner"].isna().tolist() == [False, False, True, True]
    assert parsed["status"].tolist() == ["ok", "ok", "no_verdict", "no_verdict"]


SCORE_PIECES = dict(
    before=st.sampled_from(["", " ", "\n", "x", "_", "\u00e9", "9", "*"]),
    keyword=st.sampled_from(["Score", "score", "SCORE", "sCoRe", "Scor", "\u017fcore", "Underscore"]),
    separator=st.text(alphabet=" \t\n\x0b*_", max_size=3),
    colon=st.sampled_from([":", "", "::"]),
    number=st.sampled_from(["4", "4.75", "-1", "+3", "7", "45", "4.", ".5", "4.5.3", "", "1e3", "\u0664", "5.0"]),
    after=st.text(alphabet=" .*_!)\n/5a\u00e9", max_size=4),
)
WINNER_PIECES = dict(
    before=st.sampled_from(["", " ", "\n", "x", "\u00e9", "*"]),
    keyword=st.sampled_from(["Winner", "winner", "WINNER", "Winer", "Winners"]),
    separator=st.text(alphabet=" \t\n*_", max_size=3),
    colon=st.sampled_from([":", "", "::"]),
    number=st.sampled_from(["Judgement A", "Judgment B", "Judgement C", "judgement a", "Judgement A | Judgement B", "Judgement AB", "Judgment  B", "Judgement"]),
    after=st.text(alphabet=" .*_!\nAJa", max_size=4),
)


@st.composite
def verdict_texts(draw, pieces):
    """Text whose end looks like a verdict, well or badly: exercises the column shortcut's edges."""
    parts = [draw(st.text(max_size=60))]
    for _ in range(draw(st.integers(1, 2))):
        parts += [draw(pieces[name]) for name in ("before", "keyword", "separator", "colon", "separator", "number", "after")]
    return "".join(parts)


@settings(deadline=None, max_examples=300)
@given(st.lists(verdict_texts(SCORE_PIECES), max_size=12), st.lists(verdict_texts(WINNER_PIECES), max_size=12))
def test_column_parsing_agrees_with_the_scalar_functions_on_verdict_like_endings(score_texts, winner_texts):
    scores = parse_scores(pd.Series(score_texts, dtype="str"))
    for text, score, status in zip(score_texts, scores["score"], scores["status"]):
        expected = parse_score(text)
        assert (math.isnan(score) and expected is None) or score == expected, text
        anywhere = parse_score(text, low=-math.inf, high=math.inf)
        assert status == ("ok" if expected is not None else "out_of_range" if anywhere is not None else "no_score"), text
    winners = parse_winners(pd.Series(winner_texts, dtype="str"))
    for text, winner in zip(winner_texts, winners["winner"]):
        assert (winner if isinstance(winner, str) else None) == parse_winner(text), text


@settings(deadline=None)  # shared CPUs: timings vary too much for a per-example deadline
@given(
    st.lists(
        st.one_of(st.text(alphabet=st.sampled_from(list("Score: 0123456789.-+*\nWinerJudgmt ABC\u0130\u212a")), max_size=40), st.text(max_size=40), st.none()),
        max_size=20,
    )
)
def test_vectorised_parsing_agrees_with_the_scalar_functions(texts):
    series = pd.Series(texts, dtype=object)
    scores = parse_scores(series)
    winners = parse_winners(series)
    for text, score, winner in zip(texts, scores["score"], winners["winner"]):
        expected = parse_score(text)
        assert (math.isnan(score) and expected is None) or score == expected
        assert (winner if isinstance(winner, str) else None) == parse_winner(text)


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("Relevant and clear.\nScore: seven", "score", "Relevant and clear.\n"),
        ("Relevant and clear.\nScore: 7", "score", "Relevant and clear.\n"),
        ("Relevant and clear. **Score", "score", "Relevant and clear.\n"),
        ("Relevant and clear.\n- **Score:** 9", "score", "Relevant and clear.\n"),
        ("Relevant and clear, cut off by max_tok", "score", "Relevant and clear, cut off by max_tok\n"),
        ("  ", "score", ""),
        ("", "score", ""),
        (None, "score", ""),
        # "score" as an ordinary word is rationale, not a verdict.
        ("The score reflects relevance.", "score", "The score reflects relevance.\n"),
        ("A is closer.\nWinner: Judgement C", "winner", "A is closer.\n"),
        ("A is closer.\nWinner:", "winner", "A is closer.\n"),
        ("A is closer. Winner", "winner", "A is closer.\n"),
    ],
)
def test_cut_before_verdict(text, kind, expected):
    assert cut_before_verdict(text, kind) == expected


def test_cut_before_verdict_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="'verdict'"):
        cut_before_verdict("text", "verdict")


def test_complete_verdict_builds_the_forced_text():
    assert complete_verdict("Good answer.\nScore: seven", "score", "4") == "Good answer.\nScore: 4"
    assert complete_verdict("Judgement B misses a point.\nWinner: Judgement", "winner", " A") == (
        "Judgement B misses a point.\nWinner: Judgement A"
    )


@settings(deadline=None)  # shared CPUs: timings vary too much for a per-example deadline
@given(st.text(max_size=200), st.sampled_from(SCORE_OPTIONS), st.sampled_from(WINNER_OPTIONS))
def test_a_forced_verdict_always_parses_to_the_forced_option(text, score_option, winner_option):
    assert parse_score(complete_verdict(text, "score", score_option)) == float(score_option)
    assert parse_winner(complete_verdict(text, "winner", winner_option)) == WINNER_OF_OPTION[winner_option]


@settings(deadline=None)  # shared CPUs: timings vary too much for a per-example deadline
@given(st.text(alphabet=st.sampled_from(list("Score:Winner Judgement AB 0123456789*-\n")), max_size=120))
def test_forced_verdicts_parse_on_verdict_like_noise(text):
    for option in SCORE_OPTIONS:
        assert parse_score(complete_verdict(text, "score", option)) == float(option)
    for option in WINNER_OPTIONS:
        assert parse_winner(complete_verdict(text, "winner", option)) == WINNER_OF_OPTION[option]


def test_the_common_verdict_shortcut_agrees_with_the_general_rule():
    from metareward.parsing import _COMMON_VERDICTS

    for line, label in _COMMON_VERDICTS.items():
        assert parse_winner(f"Winner: {line}") == label
        # A trailing space takes the general path.
        assert parse_winner(f"Winner: {line} ") == label

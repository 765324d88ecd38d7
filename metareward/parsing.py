"""Reading verdicts out of judge and meta-judge texts.

Scores: the last `Score: x` the judge wrote, x a decimal number (`4`, `4.75`, `-1`), kept only
when low <= x <= high. Accepted around it: any letter case of "score", markdown emphasis and
spaces between the word, the colon and the number (`**Score:** 4`, `score: 4/5`, the number on the next line).
A later "Score:" without a number ("Score: <total points>") does not hide an earlier numbered one.

Winners: the last line holding `Winner:` (any case, markdown allowed); its text up to the end of
that line (or the next non-empty line when the colon ends its line) must name exactly one label, `A`
or `B`, each written `Judgement X` or `Judgment X` (both spellings, any case). "Winner: Judgement C",
"Winner: [Judgement A | Judgement B]" (the format echoed) and a line without a label give None.

Only ASCII letters and digits count (Unicode case folding and non-ASCII digits are ignored), so
the same text parses the same everywhere. Only the judge's own text is ever parsed: a response
that itself contains "Score: 5" is never read here.

`parse_scores` / `parse_winners` parse a whole column with the same result as the scalar functions
row by row: a verdict that plainly ends its text is read for all rows at once by RE2 (pyarrow) on
the texts' tails, texts without the keyword are settled by one Arrow scan, and only the rest go
through the regexes above one by one.

`forced` verdict mode (docs/method.md): where parsing fails, `cut_before_verdict` gives the
rationale to continue (everything before the last, failed verdict keyword) and the engine appends
SCORE_PREFIX / WINNER_PREFIX plus one option; `complete_verdict` builds that completed text.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from metareward.prompts import SCORE_PREFIX, WINNER_PREFIX
from metareward.schema import (
    SCORE,
    STATUS,
    STATUS_NO_SCORE,
    STATUS_NO_VERDICT,
    STATUS_OK,
    STATUS_OUT_OF_RANGE,
    WINNER,
)

VerdictKind = Literal["score", "winner"]

_FLAGS = re.IGNORECASE | re.ASCII | re.DOTALL
# Greedy `.*` makes match() find the last occurrence. `[\s*_]` lets markdown sit around the colon.
_LAST_SCORE = re.compile(r".*\bscore[\s*_]*:[\s*_]*([+-]?\d+(?:\.\d+)?)", _FLAGS)
_LAST_WINNER_LINE = re.compile(r".*\bwinner[\s*_]*:[ \t*_]*(?:\n\s*)?([^\n]*)", _FLAGS)
# Vectorised shortcut (`_tail_verdicts`): a verdict that ends the text in its plainest form is read
# by RE2 over the last TAIL_BYTES bytes of the whole column at once. Each pattern matches only where
# the greedy patterns above must give the same answer: a non-word character before the keyword
# (the `\\b`), ASCII classes for `re.ASCII | re.IGNORECASE`, and after the verdict no letter or
# digit, so no later verdict and no longer number can follow. Everything else takes the row path.
_TAIL_BYTES = 48
_SEPARATOR = r"[\t\n\x0b\x0c\r *_]"
_SCORE_TAIL = (
    r"[^A-Za-z0-9_][Ss][Cc][Oo][Rr][Ee]" + _SEPARATOR + r"*:" + _SEPARATOR
    + r"*(?P<verdict>[+-]?[0-9]+(?:\.[0-9]+)?)[^A-Za-z0-9]*$"
)
_SCORE_WORD = r"[Ss][Cc][Oo][Rr][Ee]"
_WINNER_WORD = r"[Ww][Ii][Nn][Nn][Ee][Rr]"
_WINNER_TAIL = r"[^A-Za-z0-9_][Ww][Ii][Nn][Nn][Ee][Rr][ *_]*:[ *_]*Judge?ment (?P<verdict>[AB])[.*_ ]*$"
# Underscores around a label are markdown (`_Judgement A_`), not part of a word: hence the lookarounds.
_LABEL = re.compile(r"(?<![a-z0-9])judge?ment[\s*_\"'\[\]():]*([a-z])(?![a-z0-9])", re.IGNORECASE | re.ASCII)
# A verdict keyword, complete or cut off by max_tokens: "Score:", "**Score**:", or "Score" at the end.
_VERDICT_KEYWORD = {
    "score": re.compile(r".*(\bscore)[\s*_]*(?::|\Z)", _FLAGS),
    "winner": re.compile(r".*(\bwinner)[\s*_]*(?::|\Z)", _FLAGS),
}
_PREFIX = {"score": SCORE_PREFIX, "winner": WINNER_PREFIX}
# The verdict lines meta-judges write most, mapped to what the general rule gives them (a shortcut).
_COMMON_VERDICTS = {
    f"{word} {label}{end}": label for word in ("Judgement", "Judgment") for label in ("A", "B") for end in ("", ".", "**")
}
_LINE_MARKUP = " \t*_#>-[("
_TRAILING_MARKUP = " \t*_#[("


def parse_score(text: str | None, low: float = 0.0, high: float = 5.0) -> float | None:
    """The last `Score: x` of a judgment as a float, or None when there is none or x is outside
    [low, high]."""
    score, status = _score_and_status(text, low, high)
    return score if status == STATUS_OK else None


def parse_winner(text: str | None) -> Literal["A", "B"] | None:
    """'A' or 'B' from the last `Winner: Judgement X` line of a meta-judgment, else None."""
    return _winner_of(text) if isinstance(text, str) else None


def parse_scores(texts: pd.Series, low: float = 0.0, high: float = 5.0) -> pd.DataFrame:
    """Parse a whole column of judgments: columns `score` (float, NaN unless ok) and `status`
    (ok, no_score, out_of_range), on the index of `texts`. The engine stage sets `forced` later.
    Same result as `parse_score` row by row (tested); faster (see `_tail_verdicts`)."""
    numbers, rest = _column_verdicts(texts, _SCORE_TAIL, _SCORE_WORD)
    shortcut = pd.notna(numbers)
    raw = np.full(len(texts), np.nan)
    raw[shortcut] = [float(number) for number in numbers[shortcut]]
    for row, text in zip(rest, texts.iloc[rest].to_numpy(dtype=object)):
        match = _LAST_SCORE.match(text) if isinstance(text, str) else None
        if match is not None:
            raw[row] = float(match.group(1))
    found = ~np.isnan(raw)
    in_range = found & (raw >= low) & (raw <= high)
    statuses = np.where(in_range, STATUS_OK, np.where(found, STATUS_OUT_OF_RANGE, STATUS_NO_SCORE))
    return pd.DataFrame(
        {SCORE: np.where(in_range, raw, np.nan), STATUS: pd.array(statuses, dtype="str")}, index=texts.index
    )


def parse_winners(texts: pd.Series) -> pd.DataFrame:
    """Parse a whole column of meta-judgments: columns `winner` ('A', 'B' or null) and `status`
    (ok, no_verdict), on the index of `texts`. Same result as `parse_winner` row by row (tested);
    faster (see `_tail_verdicts`)."""
    labels, rest = _column_verdicts(texts, _WINNER_TAIL, _WINNER_WORD)
    shortcut = pd.notna(labels)
    winners = np.full(len(texts), None, dtype=object)
    winners[shortcut] = [label.decode("ascii") for label in labels[shortcut]]
    winners[rest] = [_winner_of(text) if isinstance(text, str) else None for text in texts.iloc[rest].to_numpy(dtype=object)]
    statuses = np.where(pd.notna(winners), STATUS_OK, STATUS_NO_VERDICT)
    return pd.DataFrame(
        {WINNER: pd.array(winners, dtype="str"), STATUS: pd.array(statuses, dtype="str")}, index=texts.index
    )


def cut_before_verdict(text: str | None, kind: VerdictKind) -> str:
    """The rationale of a judgment (`kind="score"`) or meta-judgment (`kind="winner"`), ready to be
    continued with the verdict prefix: the text before its last verdict keyword ("Score:" /
    "Winner:", or the bare word at the very end, as left by max_tokens), dropping markdown that
    only opened the verdict; trailing whitespace removed and one newline added, so the verdict
    starts its own line. Empty or missing text gives "". Apply it only where parsing failed: a
    valid verdict is cut just the same."""
    pattern = _VERDICT_KEYWORD.get(kind)
    if pattern is None:
        raise ValueError(f"kind must be 'score' or 'winner', got {kind!r}")
    if not isinstance(text, str):
        return ""
    keyword = pattern.match(text)
    if keyword is not None:
        cut = keyword.start(1)
        line_start = text.rfind("\n", 0, cut) + 1
        # Markdown that opened the verdict ("- **Score") goes with it.
        if not text[line_start:cut].strip(_LINE_MARKUP):
            cut = line_start
        text = text[:cut].rstrip(_TRAILING_MARKUP)
    rationale = text.rstrip()
    return rationale + "\n" if rationale else ""


def complete_verdict(text: str | None, kind: VerdictKind, option: str) -> str:
    """The stored text of a forced verdict: `cut_before_verdict(text, kind)` + prefix + option,
    e.g. option "4" for a score, " A" for a winner."""
    return cut_before_verdict(text, kind) + _PREFIX[kind] + option


def _winner_of(text: str) -> Literal["A", "B"] | None:
    line = _LAST_WINNER_LINE.match(text)
    if line is None:
        return None
    verdict = line.group(1)
    common = _COMMON_VERDICTS.get(verdict)
    if common is not None:
        return common
    labels = _LABEL.findall(verdict)
    if not labels:
        return None
    label = labels[0].upper()
    if label not in ("A", "B") or any(other.upper() != label for other in labels[1:]):
        return None
    return label  # type: ignore[return-value]


def _score_and_status(text: str | None, low: float, high: float) -> tuple[float, str]:
    if not isinstance(text, str):
        return math.nan, STATUS_NO_SCORE
    match = _LAST_SCORE.match(text)
    if match is None:
        return math.nan, STATUS_NO_SCORE
    score = float(match.group(1))
    if not low <= score <= high:
        return score, STATUS_OUT_OF_RANGE
    return score, STATUS_OK



def _column_verdicts(texts: pd.Series, tail_pattern: str, word_pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised part of parsing a column, in two Arrow calls over the whole column:
    - the `verdict` group of `tail_pattern` matched against the last _TAIL_BYTES bytes of every
      text (slicing bytes is O(1) per row; RE2 scans only the tail), as bytes in an object array,
      None where the shortcut does not apply;
    - the rows that need the row-by-row path: no shortcut, and the verdict keyword somewhere in the
      text (`word_pattern`, ASCII classes: a superset of where the row regex can match). The other
      rows have no verdict, without paying for a full regex backtrack.
    A column holding anything but str and nulls sends every row down the row path."""
    try:
        column = pa.chunked_array([pa.array(texts.array, from_pandas=True)]).cast(pa.large_binary())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return np.full(len(texts), None, dtype=object), np.arange(len(texts))
    found = pc.extract_regex(pc.binary_slice(column, -_TAIL_BYTES), tail_pattern)
    verdicts = np.array(pc.struct_field(found, "verdict").to_pylist(), dtype=object)
    rest = np.flatnonzero(pd.isna(verdicts))
    has_word = pc.match_substring_regex(column.take(pa.array(rest, type=pa.int64())), word_pattern).fill_null(False)
    return verdicts, rest[has_word.to_numpy()]

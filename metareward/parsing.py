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
_LABEL = re.compile(r"\bjudge?ment[\s*_\"'\[\]():]*([a-z])\b", re.IGNORECASE | re.ASCII)
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
    Same rules as `parse_score`, row by row."""
    # Iterating an object array is several times faster than iterating an Arrow-backed Series.
    matches = [_LAST_SCORE.match(text) if isinstance(text, str) else None for text in texts.to_numpy(dtype=object)]
    raw = np.array([float(match.group(1)) if match is not None else np.nan for match in matches], dtype=np.float64)
    found = ~np.isnan(raw)
    in_range = found & (raw >= low) & (raw <= high)
    statuses = np.where(in_range, STATUS_OK, np.where(found, STATUS_OUT_OF_RANGE, STATUS_NO_SCORE))
    return pd.DataFrame(
        {SCORE: np.where(in_range, raw, np.nan), STATUS: pd.array(statuses, dtype="str")}, index=texts.index
    )


def parse_winners(texts: pd.Series) -> pd.DataFrame:
    """Parse a whole column of meta-judgments: columns `winner` ('A', 'B' or null) and `status`
    (ok, no_verdict), on the index of `texts`. Same rules as `parse_winner`, row by row."""
    winners = [_winner_of(text) if isinstance(text, str) else None for text in texts.to_numpy(dtype=object)]
    decided = np.array([winner is not None for winner in winners], dtype=bool)
    statuses = np.where(decided, STATUS_OK, STATUS_NO_VERDICT)
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

